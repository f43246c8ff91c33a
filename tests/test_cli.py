from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _npugate(*args: str, env_models: Path) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "NPUGATE_MODELS_DIR": str(env_models),
                               "CHAT_MODEL_PATH": "", "NPUGATE_CHAT_MODELS": ""})


def test_serve_without_models_says_run_prepare(tmp_path: Path) -> None:
    proc = _npugate("serve", env_models=tmp_path)
    assert proc.returncode == 2
    assert "npugate prepare" in proc.stderr


def test_serve_with_missing_folder(tmp_path: Path) -> None:
    proc = _npugate("serve", "--chat-model", str(tmp_path / "nope"), env_models=tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_prepare_unknown_model(tmp_path: Path) -> None:
    proc = _npugate("prepare", "gpt-5", env_models=tmp_path)
    assert proc.returncode == 2 and "known: smollm2-135m-instruct" in proc.stderr


def test_prepare_is_idempotent(smollm2_dir: Path, minilm_dir: Path) -> None:
    # both defaults built (with this toolchain) by the fixtures: nothing left to do
    proc = _npugate("prepare", env_models=smollm2_dir.parent)
    assert proc.returncode == 0, proc.stderr
    assert "already prepared" in proc.stdout


def test_number_flags_reach_settings_from_env_and_flags(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    from server.cli import NUMBER_FLAGS, _parser
    from server.settings import Settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    for flag, field, env, _ in NUMBER_FLAGS:
        assert field in fields, flag
        monkeypatch.setenv(env, "3")
        assert getattr(_parser().parse_args(["serve"]), field) == 3, env
        assert getattr(_parser().parse_args(["serve", flag, "7"]), field) == 7, flag
        monkeypatch.delenv(env)
    assert _parser().parse_args(["serve"]).shutdown_grace_s == Settings().shutdown_grace_s


def test_api_keys_come_from_repeated_flags_and_options_are_never_abbreviated(
        phi3_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    import server.serve
    from server.cli import _parser, main

    served = []
    monkeypatch.setattr(server.serve, "serve", served.append)
    monkeypatch.setenv("NPUGATE_API_KEYS", "sk-env")
    assert main(["serve", "--chat-model", str(phi3_dir), "--api-key", "sk-test",
                 "--api-key", "sk-two"]) == 0
    assert served[0].api_keys == ("sk-env", "sk-test", "sk-two")
    with pytest.raises(SystemExit):  # once read as --api-key-file sk-test
        _parser().parse_args(["serve", "--api-key-f", "sk-test"])
