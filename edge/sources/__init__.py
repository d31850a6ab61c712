"""Sources: where frames come from (the pipeline's first stage).

Rule: one module per kind of frame source behind ``protocol.FrameSource`` (replayed
folders, videos and arrays; GenICam cameras with their node map). A source yields
``protocol.Frame`` objects and knows nothing of models or verdicts beyond an optional
NG output signal.
"""
