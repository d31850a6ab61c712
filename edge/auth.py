"""Credentials for the network sides: password hashes, the users file, secrets from files
or environment variables.

Passwords are stored as PBKDF2-HMAC-SHA256 hashes (``pbkdf2_sha256$<iterations>$<salt>$<hash>``,
base64 salt and hash), made with ``pouta-edge hash-password``; a plain password never
sits in a config file. Secrets (the live view token, the MQTT password) come from a file
or an environment variable, so they do not show in ``ps``, in ``--print-config`` or in a
config file that is copied around.

The users file (YAML or JSON)::

    users:
      plc-line3: {password_hash: "pbkdf2_sha256$600000$...", role: operator}
      dashboard: {password_hash: "pbkdf2_sha256$600000$...", role: viewer}
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .contract.errors import ConfigError

SCHEME = "pbkdf2_sha256"
ITERATIONS = 600_000  # OWASP's 2023 figure for PBKDF2-HMAC-SHA256
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    b64 = base64.b64encode
    return f"{SCHEME}${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def _parse_hash(field: str, text: str) -> tuple[int, bytes, bytes]:
    try:
        scheme, iters, salt, digest = str(text).split("$")
        if scheme != SCHEME:
            raise ValueError(scheme)
        n = int(iters)
        if n < 1:
            raise ValueError(iters)
        return n, base64.b64decode(salt, validate=True), base64.b64decode(digest, validate=True)
    except ValueError:
        raise ConfigError(
            f"{field}: expected a hash from 'pouta-edge hash-password' ({SCHEME}$N$salt$hash)"
        ) from None


def verify_password(password: str, stored: str) -> bool:
    iters, salt, digest = _parse_hash("password_hash", stored)
    got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iters)
    return hmac.compare_digest(got, digest)


@dataclass(frozen=True)
class Account:
    name: str
    role: str
    password_hash: str


class Users:
    """The accounts of a users file; ``check`` answers a login in constant time per account."""

    def __init__(self, accounts: dict[str, Account]) -> None:
        self.accounts = accounts
        # A login for an unknown name costs as much as one for a known name.
        self._dummy = hash_password(secrets.token_hex(8), 1000)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Users:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: users file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({str(exc).splitlines()[0]})") from None
        users = data.get("users") if isinstance(data, dict) else None
        if not isinstance(users, dict):
            raise ConfigError(f"{p}: expected 'users:' mapping names to {{password_hash, role}}")
        accounts: dict[str, Account] = {}
        for name, entry in users.items():
            where = f"{p}: users.{name}"
            if not isinstance(name, str) or not name or not set(name) <= NAME_CHARS:
                raise ConfigError(f"{where}: expected a user name of letters, digits and ._-@")
            if not isinstance(entry, dict) or not isinstance(entry.get("role"), str):
                raise ConfigError(f"{where}: expected {{password_hash: ..., role: ...}}")
            _parse_hash(f"{where}.password_hash", entry.get("password_hash", ""))
            accounts[name] = Account(name, entry["role"], str(entry["password_hash"]))
        return cls(accounts)

    def check(self, name: str | None, password: str | None) -> Account | None:
        """The account when ``password`` is right, else None."""
        account = self.accounts.get(name or "")
        ok = verify_password(password or "", account.password_hash if account else self._dummy)
        return account if ok and account is not None else None


def read_secret(field: str, value: Any, file: Any = None, env: Any = None) -> str | None:
    """A secret from ``file`` (first line), else from environment variable ``env``, else
    ``value`` itself; None when none is set. Only strings: a YAML number (``token: 1234``)
    is a config error, not a crash later."""
    if file:
        p = Path(str(file))
        try:
            text = p.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{field}_file: cannot read {p} ({exc.strerror or exc})") from None
        if not text:
            raise ConfigError(f"{field}_file: {p} is empty")
        return text.splitlines()[0]
    if env:
        text = os.environ.get(str(env), "")
        if not text:
            raise ConfigError(f"{field}_env: environment variable {env} is not set or empty")
        return text
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field}: expected a string (quote it in YAML), got {type(value).__name__}")
    return value
