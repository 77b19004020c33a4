"""`octaskly token create|revoke`, and where client commands find a token."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from octaskly import errors
from octaskly.cli.client import APIError, Client
from octaskly.config import settings as config_settings
from octaskly.services import tokens

TOKEN_FILE = "admin.token"
SECRET_FILE = "secret.key"
DEV_DATA_DIR = Path(".octaskly")
SYSTEM_DATA_DIR = Path("/var/lib/octaskly")


def token_dirs(settings: config_settings.Settings, explicit: bool) -> list[Path]:
    """Data dirs that may hold this machine's admin token, most specific first."""
    if explicit:
        return [settings.data_dir()]
    return list(dict.fromkeys([DEV_DATA_DIR, settings.data_dir(), SYSTEM_DATA_DIR]))


def find_token(settings: config_settings.Settings, *, data_dir_given: bool) -> str | None:
    """--token / OCTASKLY_TOKEN / config, else the admin token a local dispatcher wrote."""
    if settings.api.token is not None:
        return settings.api.token.get_secret_value()
    for directory in token_dirs(settings, data_dir_given):
        try:
            text = (directory / TOKEN_FILE).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return None


def local_secret(settings: config_settings.Settings) -> bytes | None:
    secret = settings.secret_bytes()
    if secret is not None:
        return secret
    try:
        data = (settings.data_dir() / SECRET_FILE).read_bytes().strip()
    except OSError:
        return None
    return data or None


def admin_token(settings: config_settings.Settings) -> str | None:
    """A token for an admin command: the one configured or found, else a short-lived admin
    token signed here with the cluster key (a Kubernetes backup job has only the key)."""
    token = find_token(settings, data_dir_given=False)
    if token is not None:
        return token
    secret = local_secret(settings)
    if secret is None:
        return None
    signed, _ = tokens.sign(
        tokens.signing_key(secret), subject="backup", role="admin", ttl=600, now=time.time()
    )
    return signed


def download_backup(settings: config_settings.Settings, output: Path, *, force: bool) -> Any:
    """`octaskly backup --api-url`: fetch GET /api/v1/backup into `output` (checked, 0600,
    renamed into place only when complete)."""
    from octaskly import files
    from octaskly.store import backup

    if output.exists() and not force:
        raise errors.ConfigError(f"{output} exists; choose another name or pass --force")
    token = admin_token(settings)
    if token is None:
        raise errors.ConfigError(
            "backup over the API needs an admin token (--token, OCTASKLY_TOKEN) or the "
            "cluster key (--secret-key-file) to sign one"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    files.write_private(partial, b"")
    try:
        with (
            Client(settings.api.api_url, token=token, timeout=300)._request(
                "GET", "/api/v1/backup"
            ) as response,
            partial.open("wb") as fh,
        ):
            while chunk := response.read(1 << 20):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        backup.check(partial)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return backup.check(output)


def _ttl(text: str) -> float:
    try:
        return tokens.parse_duration(text)
    except ValueError as exc:
        raise errors.ConfigError(f"--ttl: {exc}") from None


def create(args: argparse.Namespace, settings: config_settings.Settings, token: str | None) -> int:
    ttl = _ttl(args.ttl)
    subject = args.subject or ("admin" if args.role == "admin" else None)
    if subject is None:
        raise errors.ConfigError("--subject is required for a non-admin token (who is it for?)")
    secret = local_secret(settings)
    if secret is not None:
        try:
            signed, claims = tokens.sign(
                tokens.signing_key(secret),
                subject=subject,
                role=args.role,
                ttl=ttl,
                now=time.time(),
            )
        except errors.ValidationError as exc:
            raise errors.ConfigError(str(exc)) from None
        body = {"token": signed, "id": claims.jti, "subject": claims.sub, "role": claims.role,
                "expires_at": claims.exp, "signed": "locally with the cluster key"}  # fmt: skip
    else:
        if token is None:
            raise errors.ConfigError(
                "no cluster key and no admin token: pass --secret-key-file (signs locally) or "
                "--token with an admin token (asks the dispatcher)"
            )
        try:
            body = Client(settings.api.api_url, token=token).call(
                "POST", "/api/v1/tokens", {"role": args.role, "subject": subject, "ttl": ttl}
            )
        except APIError as exc:
            print(f"error: {exc} (HTTP {exc.status})", file=sys.stderr)
            return 2 if exc.status == 400 else 1
    if args.json:
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(body["token"])
        print(f"token {body['id']} for {body['subject']} ({body['role']})", file=sys.stderr)
    return 0


def revoke(args: argparse.Namespace, settings: config_settings.Settings, token: str | None) -> int:
    try:
        body = Client(settings.api.api_url, token=token).call(
            "DELETE", f"/api/v1/tokens/{args.token_id}"
        )
    except APIError as exc:
        print(f"error: {exc} (HTTP {exc.status})", file=sys.stderr)
        return 2 if exc.status == 400 else 1
    print(f"token {body['id']} {body['message']}")
    return 0
