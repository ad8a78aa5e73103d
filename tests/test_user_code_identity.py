"""run.started.code_id is the user's code (the entry script's git tree); ledger_version is ckpt-ledger's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer_support import REPO, cli_env

from ledger import Ledger
from trainer.identity import code_id, entry_script, ledger_version, user_code_id

USER_SCRIPT = """
import sys
from trainer.run_recorder import RunRecorder
from trainer.identity import user_code_id, ledger_version
recorder = RunRecorder(sys.argv[1])
recorder.start_run({}, "h", user_code_id(), ledger_version=ledger_version())
recorder.close()
"""


def _git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x", "GIT_COMMITTER_NAME": "u", "GIT_COMMITTER_EMAIL": "u@x",
           "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_code_id_is_the_users_repo_not_ckpt_ledgers(tmp_path):
    user = tmp_path / "myproject"
    user.mkdir()
    (user / "train.py").write_text(USER_SCRIPT)
    _git(user, "init", "-q")
    _git(user, "add", "train.py")
    _git(user, "commit", "-qm", "mine")
    sha = _git(user, "rev-parse", "HEAD")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(user / "train.py"), str(run_dir)], env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = Ledger.open(run_dir, read_only=True).projection().run
    assert run.code_id == sha
    assert run.ledger_version is not None and run.ledger_version == ledger_version()
    # A dirty tree gets a -dirty-<hash> suffix (a second run records its own run.started).
    (user / "train.py").write_text(USER_SCRIPT + "\n# edited\n")
    done = subprocess.run([sys.executable, str(user / "train.py"), str(tmp_path / "run2")], env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Ledger.open(tmp_path / "run2", read_only=True).projection().run.code_id.startswith(f"{sha}-dirty-")


def test_entry_script_under_python_m_and_outside_git(tmp_path):
    script = tmp_path / "loose.py"
    script.write_text("")
    assert entry_script([str(script)]) == script.resolve()
    assert user_code_id([str(script)]) is None  # not in a git checkout
    assert entry_script(["-c"]) in (None, entry_script([]))
    assert code_id(REPO) is not None and ledger_version().split("+")[0]
