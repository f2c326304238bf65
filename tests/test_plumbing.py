"""rbee's pure plumbing, tested in process: model references and GGUF choice, stop strings, ssh
command lines and their failures, the quoting of remote command lines, `--env` pairs, byte sizes
and the error envelope.

Nothing of rbee is mocked. Where a function produces a command line, the test runs it for real
(/bin/sh, `ssh -G`) rather than comparing strings, so a quoting mistake shows up as what it is.
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import RBEE, REPO

sys.path.insert(0, str(REPO))
import rbee  # noqa: E402


def raises_rbee(code, function, *args, **kwargs):
    """Call `function`; assert it raises an RbeeError with `code`; return that error."""
    with pytest.raises(rbee.RbeeError) as caught:
        function(*args, **kwargs)
    assert caught.value.code == code, caught.value.envelope()
    return caught.value


# ============================================================================================
# Model references: hf:ORG/REPO[:SELECTOR] and file:/abs/path.gguf
# ============================================================================================

@pytest.mark.parametrize("text, provider, reference, selector, normalised", [
    ("hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", "hf", "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", None,
     "hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF"),
    ("hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:tinyllama-1.1b-chat-v1.0.Q8_0.gguf", "hf",
     "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", "tinyllama-1.1b-chat-v1.0.Q8_0.gguf",
     "hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:tinyllama-1.1b-chat-v1.0.Q8_0.gguf"),
    ("hf:bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M", "hf", "bartowski/SmolLM2-135M-Instruct-GGUF", "Q4_K_M",
     "hf:bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"),
    ("  hf:org_1/repo.name  ", "hf", "org_1/repo.name", None, "hf:org_1/repo.name"),
    ("file:/models/tiny.gguf", "file", "/models/tiny.gguf", None, "file:/models/tiny.gguf"),
    ("file:///models/tiny.gguf", "file", "/models/tiny.gguf", None, "file:/models/tiny.gguf"),
    ("file:/models/./sub/../tiny.gguf", "file", "/models/tiny.gguf", None, "file:/models/tiny.gguf"),
    ("file:/models with space/tiny.gguf", "file", "/models with space/tiny.gguf", None,
     "file:/models with space/tiny.gguf"),
])
def test_model_ref_parses_valid_references(text, provider, reference, selector, normalised):
    ref = rbee.ModelRef.parse(text)
    assert (ref.provider, ref.reference, ref.selector) == (provider, reference, selector)
    assert ref.text == normalised


@pytest.mark.parametrize("text", [
    None,
    "",
    "   ",
    "\t\n",
    "TheBloke/TinyLlama",              # no provider
    "hf:",
    "hf:onlyorg",
    "hf:a/b/c",
    "hf:org/repo:",                    # a selector separator with no selector
    "hf:org/repo:Q4 K M",              # whitespace inside
    "hf:or..g/repo",                   # ".." in org
    "hf:org/re..po",                   # ".." in repo
    "hf:../repo",
    "hf:org/..",
    "hf:/repo",
    "file:relative/x.gguf",
    "file:",
    "file:/dir/",                      # a directory, not a file
    "http://x/y.gguf",
    "ollama:llama3",
])
def test_model_ref_rejects_invalid_references(text):
    err = raises_rbee("INVALID_MODEL_REF", rbee.ModelRef.parse, text)
    assert err.suggestion, "an invalid reference must say what a valid one looks like"
    assert "hf:" in err.suggestion and "file:" in err.suggestion, err.suggestion


# ============================================================================================
# choose_gguf: which file of a GGUF repo to download
# ============================================================================================

QUANTS = ["m.Q8_0.gguf", "m.Q4_0.gguf", "m.Q4_K_M.gguf", "m.Q5_K_M.gguf", "m.F16.gguf"]


@pytest.mark.parametrize("filenames, selector, expected", [
    # the only .gguf, whatever its name; other files are ignored
    (["README.md", "config.json", "model.gguf"], None, "model.gguf"),
    (["README.md", "weights.Q8_0.gguf", ".gitattributes"], None, "weights.Q8_0.gguf"),
    # the quantisation preference: Q4_K_M, then Q4_0, then Q8_0 ...
    (QUANTS, None, "m.Q4_K_M.gguf"),
    ([f for f in QUANTS if "Q4_K_M" not in f], None, "m.Q4_0.gguf"),
    (["m.Q8_0.gguf", "m.F16.gguf", "m.Q5_K_M.gguf"], None, "m.Q5_K_M.gguf"),
    (["m.Q8_0.gguf", "m.F16.gguf"], None, "m.Q8_0.gguf"),
    # case-insensitive, in the tag and in the extension
    (["m.q8_0.gguf", "m.q4_k_m.GGUF", "m.f16.gguf"], None, "m.q4_k_m.GGUF"),
    # split models: only the first part, never a later one
    (["m-Q4_K_M-00002-of-00003.gguf", "m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00003-of-00003.gguf"],
     None, "m-Q4_K_M-00001-of-00003.gguf"),
    (["m-Q4_K_M-00002-of-00002.gguf", "m.Q8_0.gguf"], None, "m.Q8_0.gguf"),
    (["m-Q4_K_M-00002-of-00002.gguf", "README.md"], None, None),
    # the selector: an exact file name (also one in a subfolder, by its base name) ...
    (QUANTS, "m.Q8_0.gguf", "m.Q8_0.gguf"),
    (["Q8_0/m.Q8_0.gguf", "Q4_K_M/m.Q4_K_M.gguf"], "m.Q8_0.gguf", "Q8_0/m.Q8_0.gguf"),
    (["Q8_0/m.Q8_0.gguf", "Q4_K_M/m.Q4_K_M.gguf"], "Q8_0/m.Q8_0.gguf", "Q8_0/m.Q8_0.gguf"),
    # ... or a quantisation tag, case-insensitive, over the preference
    (QUANTS, "Q8_0", "m.Q8_0.gguf"),
    (QUANTS, "q5_k_m", "m.Q5_K_M.gguf"),
    (["m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf", "m.Q4_K_M.gguf"], "Q8_0",
     "m-Q8_0-00001-of-00002.gguf"),
    # nothing fits
    (QUANTS, "Q2_K", None),
    (QUANTS, "other.gguf", None),
    ([], None, None),
    (["README.md", "model.safetensors"], None, None),
    (["README.md", "model.safetensors"], "Q4_K_M", None),
])
def test_choose_gguf(filenames, selector, expected):
    assert rbee.choose_gguf(filenames, selector) == expected


def test_choose_gguf_does_not_depend_on_listing_order():
    for rotation in range(len(QUANTS)):
        listing = QUANTS[rotation:] + QUANTS[:rotation]
        assert rbee.choose_gguf(listing) == "m.Q4_K_M.gguf", listing
        assert rbee.choose_gguf(list(reversed(listing))) == "m.Q4_K_M.gguf", listing


# ============================================================================================
# split_at_stop: what of the generated text may be sent, given the stop strings
# ============================================================================================

@pytest.mark.parametrize("text, stops, expected", [
    # no stops: everything can be sent
    ("Hello world", [], ("Hello world", "", None)),
    ("", [], ("", "", None)),
    ("", ["</s>"], ("", "", None)),
    # a stop inside the text cuts there, at the earliest of several, and is named
    ("Hello</s> more", ["</s>"], ("Hello", "", "</s>")),
    ("one END two STOP", ["STOP", "END"], ("one ", "", "END")),
    ("</s>", ["</s>"], ("", "", "</s>")),
    ("a\n\nb", ["\n\n"], ("a", "", "\n\n")),
    ("xEND", ["END", "EN"], ("x", "", "END")),   # (two at one place: the first given)
    # a complete stop wins over a tail that could become another
    ("x</s> <", ["</s>", "<|end|>"], ("x", "", "</s>")),
    # a tail that could still become a stop string is held back ...
    ("Hello <", ["</s>"], ("Hello ", "<", None)),
    ("Hello </", ["</s>"], ("Hello ", "</", None)),
    ("Hello\n", ["\n\n"], ("Hello", "\n", None)),
    # ... the longest such tail over all the stops
    ("xab", ["bq", "abz"], ("x", "ab", None)),
    ("text <|e", ["<|x", "<|end|>"], ("text ", "<|e", None)),
    # a tail that is not the start of a stop is sent
    ("Hello s>", ["</s>"], ("Hello s>", "", None)),
    ("Hello /s", ["</s>"], ("Hello /s", "", None)),
])
def test_split_at_stop(text, stops, expected):
    assert rbee.split_at_stop(text, stops) == expected


@pytest.mark.parametrize("text", ["", "abc", "ab<", "ab</", "ab</s", "a<|en", "x\n"])
def test_split_at_stop_loses_nothing_before_a_stop(text):
    sendable, held, stopped = rbee.split_at_stop(text, ["</s>", "<|end|>", "\n\n"])
    assert not stopped
    assert sendable + held == text


# ============================================================================================
# ssh: failures in words a user can act on
# ============================================================================================

TARGET_ARGS = ("h", 2222, "u")

SSH_STDERR = {
    "auth": "Permission denied (publickey).",
    "auth_many": "Warning: Permanently added 'h' (ED25519) to the list of known hosts.\r\n"
                 "u@h: Permission denied (publickey,password).",
    "hostkey": "@@@@@@@@@@@\n@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @\n"
               "Host key verification failed.",
    "dns": "ssh: Could not resolve hostname x: Name or service not known",
    "refused": "ssh: connect to host h port 2222: Connection refused",
}


@pytest.mark.parametrize("case, why", [
    ("auth", "authentication failed"),
    ("auth_many", "authentication failed"),
    ("hostkey", "host key verification failed"),
    ("dns", "unknown host"),
    ("refused", "host unreachable"),
])
@pytest.mark.parametrize("node", ["gpu-box", None])
def test_ssh_failure_says_why(case, why, node):
    target = rbee.SshTarget(*TARGET_ARGS)
    stderr = SSH_STDERR[case]
    err = rbee.ssh_failure(target, stderr, node=node, attempts=3)
    assert isinstance(err, rbee.RbeeError)
    assert err.code == "SSH_FAILED"
    assert why in err.message, err.message
    assert "3 attempts" in err.message, err.message
    assert err.details["node"] == node
    assert err.details["ssh_host"] == "h"
    assert err.details["ssh_port"] == 2222
    assert err.details["attempts"] == 3
    assert err.details["ssh_said"] == stderr.strip()
    assert err.suggestion
    if node:
        assert "rbee.py nodes check %s" % node in err.suggestion, err.suggestion
    else:
        assert "nodes check" not in err.suggestion, err.suggestion


@pytest.mark.parametrize("case, hint", [
    ("auth", "--ssh-key"),
    ("hostkey", "ssh-keyscan"),
    ("dns", "--ssh-host"),
    ("refused", "2222"),
])
def test_ssh_failure_suggestion_fits_the_failure(case, hint):
    err = rbee.ssh_failure(rbee.SshTarget(*TARGET_ARGS), SSH_STDERR[case], node="gpu-box")
    assert hint in err.suggestion, err.suggestion


def test_ssh_failure_host_key_suggestion_names_host_and_port():
    err = rbee.ssh_failure(rbee.SshTarget("build-01.lan", 2222, "u"), SSH_STDERR["hostkey"])
    assert "ssh-keyscan" in err.suggestion and "2222" in err.suggestion and "build-01.lan" in err.suggestion


def test_ssh_failure_counts_the_attempts_made():
    err = rbee.ssh_failure(rbee.SshTarget(*TARGET_ARGS), SSH_STDERR["auth"], node="n", attempts=1)
    assert err.details["attempts"] == 1
    assert "1 attempt" in err.message and "1 attempts" not in err.message, err.message


def test_ssh_failure_keeps_only_the_end_of_a_long_stderr():
    stderr = "noise\n" * 1000 + "ssh: connect to host h port 2222: Connection refused"
    err = rbee.ssh_failure(rbee.SshTarget(*TARGET_ARGS), stderr)
    assert err.details["ssh_said"].endswith("Connection refused")
    assert len(err.details["ssh_said"]) < 1000


@pytest.mark.parametrize("stderr, failed", [
    ("Permission denied (publickey).", True),
    ("u@h: Permission denied (publickey,password).", True),
    ("Received disconnect from 10.0.0.2 port 22:2: Too many authentication failures", True),
    ("Host key verification failed.", False),
    ("ssh: Could not resolve hostname x: Name or service not known", False),
    ("ssh: connect to host h port 2222: Connection refused", False),
    ("", False),
    (None, False),
])
def test_ssh_auth_failed(stderr, failed):
    assert rbee.ssh_auth_failed(stderr) is failed


# ============================================================================================
# ssh: the command line
# ============================================================================================

def option_values(argv, flag):
    """The values given to `flag` (e.g. "-o") in argv."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


@pytest.fixture
def no_ssh_config(monkeypatch):
    monkeypatch.delenv("RBEE_SSH_CONFIG", raising=False)


def test_ssh_argv_options(no_ssh_config):
    argv = rbee.SshTarget("gpu.lan", 2222, "alice", "~/.ssh/rbee_key").argv("echo hi")
    assert argv[0] == "ssh"
    assert argv[-1] == "echo hi", "the command comes last"
    assert argv[-2] == "gpu.lan" or argv[-3:-1] == ["--", "gpu.lan"]
    options = option_values(argv, "-o")
    assert "BatchMode=yes" in options, "ssh must never prompt for a password"
    assert "ControlMaster=auto" in options
    assert any(o.startswith("ControlPath=") for o in options)
    assert any(o.startswith("ControlPersist=") for o in options)
    assert "IdentitiesOnly=yes" in options
    assert option_values(argv, "-p") == ["2222"]
    assert option_values(argv, "-l") == ["alice"]
    assert option_values(argv, "-i") == [os.path.expanduser("~/.ssh/rbee_key")]
    assert "-t" not in argv


def test_ssh_argv_defaults(no_ssh_config):
    argv = rbee.SshTarget("gpu.lan").argv("true")
    assert argv[-1] == "true"
    assert "-p" not in argv, "port 22 is ssh's default: no -p"
    assert "-l" not in argv and "-i" not in argv
    assert "IdentitiesOnly=yes" not in option_values(argv, "-o")
    assert "BatchMode=yes" in option_values(argv, "-o")


def test_ssh_argv_uses_rbee_ssh_config(monkeypatch, tmp_path):
    config = tmp_path / "ssh config"
    config.write_text("Host *\n")
    monkeypatch.setenv("RBEE_SSH_CONFIG", str(config))
    argv = rbee.SshTarget("gpu.lan").argv("true")
    assert option_values(argv, "-F") == [str(config)]


def ssh_effective_config(argv):
    """What the real OpenSSH client makes of `argv` (`ssh -G`: parses, prints, connects nowhere)."""
    out = subprocess.run(argv[:1] + ["-G"] + argv[1:-1], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    config = {}
    for line in out.stdout.splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key, []).append(value)
    return config


def test_ssh_argv_is_understood_by_openssh(no_ssh_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.ssh/config of this machine's user
    key = tmp_path / "id_test"
    key.write_text("not a real key\n")   # ssh drops an -i file that does not exist
    argv = rbee.SshTarget("gpu.lan", 2222, "alice", str(key)).argv("echo hi")
    config = ssh_effective_config(argv)
    assert config["hostname"] == ["gpu.lan"]
    assert config["port"] == ["2222"]
    assert config["user"] == ["alice"]
    assert config["batchmode"] == ["yes"]
    assert config["identitiesonly"] == ["yes"]
    assert str(key) in config["identityfile"], config["identityfile"]
    assert config["controlmaster"] == ["auto"]


def run_ssh(argv, home):
    """Run an ssh command line for real, with no ~/.ssh of this machine's user; BatchMode, and a
    host that never answers a login: it ends on its own, and nothing here is worth its output."""
    return subprocess.run(argv, env=dict(os.environ, HOME=str(home)), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30)


def test_ssh_host_can_never_become_an_option(no_ssh_config, tmp_path):
    # A host starting with "-" (from `nodes add --ssh-host`) must never be read by ssh as an
    # option: "-oProxyCommand=..." would run a local command. Either SshTarget refuses such a host
    # (an RbeeError), or its argv, run here by the real ssh, leaves the canary uncreated.
    canary = tmp_path / "pwned"
    host = "-oProxyCommand=touch %s" % canary
    # the canary can trip: where ssh reads the host as an option, the ProxyCommand creates it
    run_ssh(["ssh", "-o", "BatchMode=yes", host, "true"], tmp_path)
    assert canary.exists(), "the control run of ssh did not create the canary: this test could not fail"
    canary.unlink()
    try:
        argv = rbee.SshTarget(host, 22, "u").argv("true")
    except rbee.RbeeError:
        return
    assert host in argv
    assert argv[argv.index(host) - 1] == "--", "the host %r can be taken for an ssh option: %r" % (host, argv)
    run_ssh(argv, tmp_path)
    assert not canary.exists(), "ssh took the host %r for an option: %r" % (host, argv)


# ============================================================================================
# Remote command lines: what the node's shell runs, run here by /bin/sh
# ============================================================================================

FAKE_RBEE = r'''
import json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(),
                  "env": {k: v for k, v in os.environ.items() if k.startswith("RBEE_T_")}}))


def main(argv):   # (a role runs rbee.main from rbee.py's bytecode: rbee.role_argv)
    return 0
'''

HOSTILE = [
    "plain",
    "two words",
    "",
    "it's",
    'say "hi"',
    "$HOME",
    "${HOME}",
    "$(touch {canary})",
    "`touch {canary}`",
    "; touch {canary}",
    "&& touch {canary} ||",
    "| touch {canary}",
    "line one\ntouch {canary}",
    "> {canary}",
    "*",
    "~",
    "~/x",
    "\\",
    "--flag=a b",
    "tab\tand\rcr",
    "unicode ✓ bee 🐝",
]


@pytest.fixture
def remote(tmp_path):
    """A fake node: a HOME, and a runner that executes a command line with /bin/sh -c there."""
    home = tmp_path / "home dir"
    home.mkdir()
    canary = tmp_path / "canary"
    bin_dir = tmp_path / "bin dir"
    bin_dir.mkdir()
    # "python" for the node: a wrapper around this Python, marking that it was the one used
    wrapper = bin_dir / "my python"
    wrapper.write_text("#!/bin/sh\nRBEE_T_VIA=wrapper exec %s \"$@\"\n" % shlex.quote(sys.executable))
    wrapper.chmod(0o755)
    (bin_dir / "python3").symlink_to(wrapper)

    def install(directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rbee.py").write_text(FAKE_RBEE)
        return directory

    def run(command):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
        env.update(HOME=str(home), PATH="%s:%s" % (bin_dir, os.environ.get("PATH", "/usr/bin:/bin")))
        out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, env=env,
                             cwd=str(tmp_path), timeout=30)
        assert out.returncode == 0, "%r failed: %s" % (command, out.stderr)
        assert not canary.exists(), "the shell executed part of an argument: %r" % command
        return json.loads(out.stdout)

    return SimpleNamespace(home=home, canary=canary, python=wrapper, install=install, run=run, tmp=tmp_path)


def test_remote_command_passes_args_unchanged(remote):
    rbee_dir = remote.install(remote.tmp / "rbee 'app' $dir")
    args = [a.replace("{canary}", str(remote.canary)) for a in HOSTILE]
    seen = remote.run(rbee.remote_command(str(rbee_dir), str(remote.python), args))
    assert seen["argv"] == ["rbee.py"] + args
    assert seen["cwd"] == str(rbee_dir)
    assert seen["env"] == {"RBEE_T_VIA": "wrapper"}, "the given python was not the one run"


def test_remote_command_passes_env_unchanged(remote):
    rbee_dir = remote.install(remote.tmp / "app")
    env = {"RBEE_T_%d" % i: value.replace("{canary}", str(remote.canary)) for i, value in enumerate(HOSTILE)}
    env["RBEE_T_EQ"] = "a=b=c"
    seen = remote.run(rbee.remote_command(str(rbee_dir), str(remote.python), ["hive", "--port", "9200"], env))
    assert seen["argv"] == ["rbee.py", "hive", "--port", "9200"]
    assert seen["env"] == dict(env, RBEE_T_VIA="wrapper")


def test_remote_command_expands_home_for_dir_and_python(remote):
    rbee_dir = remote.install(remote.home / "my apps" / "rbee")
    py_dir = remote.home / "py dir"
    py_dir.mkdir()
    (py_dir / "python").symlink_to(remote.python)
    seen = remote.run(rbee.remote_command("~/my apps/rbee", "~/py dir/python", ["$HOME", "~/x"]))
    assert seen["cwd"] == str(rbee_dir)
    assert seen["argv"] == ["rbee.py", "$HOME", "~/x"], "only rbee's own ~/ paths are expanded"
    assert seen["env"] == {"RBEE_T_VIA": "wrapper"}


def test_remote_command_defaults(remote):
    # no dir, no python: ~/.rbee/app and the node's python3 (here the wrapper, first on PATH)
    rbee_dir = remote.install(remote.home / ".rbee" / "app")
    seen = remote.run(rbee.remote_command(None, None, ["status"]))
    assert seen["cwd"] == str(rbee_dir)
    assert seen["argv"] == ["rbee.py", "status"]
    assert seen["env"] == {"RBEE_T_VIA": "wrapper"}


def test_remote_command_fails_in_a_missing_dir(remote):
    # `cd DIR && exec ...`: a missing dir must not run rbee.py from wherever the shell started
    remote.install(remote.tmp)   # an rbee.py in the shell's starting dir
    command = rbee.remote_command(str(remote.tmp / "missing"), str(remote.python), ["status"])
    out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, cwd=str(remote.tmp))
    assert out.returncode != 0
    assert out.stdout == ""


@pytest.mark.parametrize("path, expanded", [
    ("~/.rbee/app", "{home}/.rbee/app"),
    ("~/dir with space/it's", "{home}/dir with space/it's"),
    ("~/$(touch {canary})", "{home}/$(touch {canary})"),
    ("/abs/plain", "/abs/plain"),
    ("/abs/$HOME/`x`;y", "/abs/$HOME/`x`;y"),
    ("relative dir", "relative dir"),
    ("~", "~"),                     # only a leading "~/" is the remote home
    ("~other/x", "~other/x"),
    ("a/~/b", "a/~/b"),
])
def test_shell_path(remote, path, expanded):
    path = path.replace("{canary}", str(remote.canary))
    command = "printf %%s %s" % rbee.shell_path(path)
    out = subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True, timeout=10,
                         env=dict(os.environ, HOME=str(remote.home)), cwd=str(remote.tmp))
    assert out.returncode == 0, out.stderr
    assert out.stdout == expanded.replace("{home}", str(remote.home)).replace("{canary}", str(remote.canary))
    assert not remote.canary.exists()


# ============================================================================================
# --env KEY=VALUE pairs, and their display with secrets masked
# ============================================================================================

@pytest.mark.parametrize("text, pair", [
    ("HF_HOME=/data/hf", ("HF_HOME", "/data/hf")),
    ("OPTS=a=b=c", ("OPTS", "a=b=c")),
    ("EMPTY=", ("EMPTY", "")),
    ("SPACED=two words", ("SPACED", "two words")),
])
def test_env_pair(text, pair):
    assert rbee.env_pair(text) == pair


@pytest.mark.parametrize("text", ["NOPAIR", "=x", "=", ""])
def test_env_pair_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        rbee.env_pair(text)


SECRETS = {
    "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz123456",
    "API_KEY": "sk-live-0123456789",
    "my_secret": "correct horse battery staple",
    "DB_PASSWORD": "hunter2-hunter2",
    "Hugging_Face_Hub_Token": "hf_ZYXWVUTSRQPONMLK",
}
PLAIN = {
    "HF_HOME": "/data/hf",
    "RBEE_HOME": "/home/u/.rbee",
    "PATH": "/usr/bin:/bin",
    "EMPTY": "",
}


def test_masked_env_masks_secrets_and_keeps_the_rest():
    env = dict(SECRETS, **PLAIN)
    before = dict(env)
    shown = rbee.masked_env(env)
    assert env == before, "masked_env must not change its argument"
    assert set(shown) == set(env)
    for key, value in SECRETS.items():
        assert shown[key] != value, key
        assert value not in str(shown[key]), "%s's value shows through: %r" % (key, shown[key])
    for key, value in PLAIN.items():
        assert shown[key] == value, key


def test_masked_env_of_nothing():
    assert rbee.masked_env({}) == {}


# ============================================================================================
# human_bytes
# ============================================================================================

@pytest.mark.parametrize("n, text", [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KB"),
    (1536, "1.5 KB"),
    (10 * 1024, "10 KB"),
    (5 * 1024 ** 2, "5.0 MB"),
    (135 * 1024 ** 2, "135 MB"),
    (int(1.5 * 1024 ** 3), "1.5 GB"),
    (40 * 1024 ** 3, "40 GB"),
])
def test_human_bytes(n, text):
    assert rbee.human_bytes(n) == text


# ============================================================================================
# The error envelope (PROTOCOL.md §7)
# ============================================================================================

@pytest.mark.parametrize("envelope", [
    {"error": {"code": "MODEL_NOT_FOUND", "message": "No GGUF in hf:a/b",
               "details": {"model": "hf:a/b", "files": ["x.bin"]}, "suggestion": "Name a GGUF repo",
               "component": "hive-rbee"}},
    {"error": {"code": "SSH_FAILED", "message": "SSH to u@h:2222 failed", "details": {"attempts": 3},
               "suggestion": "Check the node", "component": "queen-rbee"}},
    {"error": {"code": "ALL_SLOTS_BUSY", "message": "busy", "details": {}, "suggestion": "Wait",
               "component": "worker-rbee"}},
])
def test_error_envelope_round_trips(envelope):
    err = rbee.RbeeError.from_envelope(json.loads(json.dumps(envelope)))
    assert isinstance(err, rbee.RbeeError)
    body = envelope["error"]
    assert (err.code, err.message, err.details, err.suggestion, err.component) == (
        body["code"], body["message"], body["details"], body["suggestion"], body["component"])
    assert err.envelope() == envelope
    again = rbee.RbeeError.from_envelope(json.loads(json.dumps(err.envelope())))
    assert (again.code, again.message, again.details, again.suggestion, again.component) == (
        err.code, err.message, err.details, err.suggestion, err.component)


def test_error_envelope_of_raised_errors_round_trips():
    errors = [raises_rbee("INVALID_MODEL_REF", rbee.ModelRef.parse, "hf:onlyorg"),
              rbee.ssh_failure(rbee.SshTarget(*TARGET_ARGS), SSH_STDERR["auth"], node="gpu-box")]
    for err in errors:
        again = rbee.RbeeError.from_envelope(json.loads(json.dumps(err.envelope())))
        assert type(again) is type(err), "the envelope of %s comes back as %s" % (type(err), type(again))
        assert (again.code, again.message, again.details, again.suggestion, again.component) == (
            err.code, err.message, err.details, err.suggestion, err.component)


@pytest.mark.parametrize("data", [None, {}, {"detail": "Not Found"}, "oops", {"error": "flat string"}])
def test_error_from_a_foreign_answer_is_internal(data):
    err = rbee.RbeeError.from_envelope(data)
    assert isinstance(err, rbee.RbeeError)
    assert err.code == "INTERNAL"


@pytest.mark.parametrize("code, cls", [("WORKER_CRASHED", "WorkerCrashed"), ("ALL_SLOTS_BUSY", "SlotsBusy"),
                                       ("SSH_FAILED", "SshFailed"), ("INTERNAL", "InternalError"),
                                       ("INVALID_REQUEST", "InvalidRequest")])
def test_an_envelope_becomes_its_typed_error(code, cls):
    err = rbee.RbeeError.from_envelope({"error": {"code": code, "message": "m"}}, component="rbee-hive")
    assert type(err) is getattr(rbee, cls) and isinstance(err, rbee.RbeeError)
    assert err.code == code and err.component == "rbee-hive"


def test_every_documented_code_has_its_class_and_status():
    codes = ("INVALID_REQUEST INVALID_MODEL_REF NODE_NOT_FOUND SSH_FAILED CONNECTION_TIMEOUT VERSION_MISMATCH "
             "MODEL_NOT_FOUND ACCESS_DENIED DOWNLOAD_FAILED CHECKSUM_MISMATCH INSUFFICIENT_DISK INSUFFICIENT_RAM "
             "VRAM_EXHAUSTED BACKEND_UNAVAILABLE DEVICE_NOT_FOUND WORKER_CRASHED LOADING_TIMEOUT ALL_SLOTS_BUSY "
             "MISSING_API_KEY INVALID_API_KEY REQUEST_CANCELLED INTERNAL PORT_IN_USE START_FAILED "
             "WORKER_NOT_FOUND RESPONSE_NOT_FOUND CONTEXT_EXCEEDED NODE_DOWN NODE_LOST").split()
    assert sorted(rbee.RbeeError.by_code) == sorted(codes)
    for code in codes:
        assert 400 <= rbee.RbeeError.by_code[code].status < 600 and rbee.RbeeError.by_code[code].code == code
    for cls in rbee.RbeeError.by_code.values():   # each class under its own name, raised as rbee raises it
        assert getattr(rbee, cls.__name__) is cls and issubclass(cls, rbee.RbeeError)
    assert rbee.SlotsBusy("busy", {"retry_after_s": 2}).response_headers() == {"Retry-After": "2"}
    assert rbee.InvalidRequest("bad").response_headers() == {}


def test_an_unknown_code_keeps_its_name_and_an_internal_class():
    err = rbee.RbeeError.from_envelope({"error": {"code": "FROM_THE_FUTURE", "message": "m"}}, status=418)
    assert isinstance(err, rbee.InternalError) and err.code == "FROM_THE_FUTURE" and err.status == 418
    assert err.envelope()["error"]["code"] == "FROM_THE_FUTURE"


def test_a_backend_error_is_wrapped_as_its_typed_error():
    import backends
    err = rbee.RbeeError.wrap(backends.BackendError("DEVICE_NOT_FOUND", "no such device", {"requested": 3}),
                              "llm-worker-rbee")
    assert type(err) is rbee.DeviceNotFound and err.details == {"requested": 3} and err.status == 400


# ============================================================================================
# KeyedLocks: one lock per key, forgotten when nobody holds it (the hive's spawn and download locks)
# ============================================================================================

def test_keyed_locks_forget_every_key_nobody_holds():
    locks = rbee.KeyedLocks()
    for n in range(30000):   # 30,000 distinct (model, backend, device) spawns
        with locks.holding(("hf:org/model-%d" % n, "cpu", 0)):
            assert len(locks) == 1
    assert len(locks) == 0


def test_keyed_locks_serialise_one_key_and_say_who_waits():
    import threading
    locks, order, waited = rbee.KeyedLocks(), [], []
    inside = threading.Event()

    def first():
        with locks.holding("model"):
            inside.set()
            order.append("first in")
            release.wait(5)
            order.append("first out")
    release = threading.Event()
    thread = threading.Thread(target=first)
    thread.start()
    inside.wait(5)

    waiting = threading.Event()

    def second():
        with locks.holding("model", on_wait=lambda: (waited.append(True), waiting.set())):
            order.append("second in")
    other = threading.Thread(target=second)
    other.start()
    with locks.holding("another model"):   # other keys are not held up
        order.append("another")
    assert waiting.wait(5)
    release.set()
    thread.join(5)
    other.join(5)
    assert waited == [True] and order.index("first out") < order.index("second in")
    assert order.index("another") < order.index("first out") and len(locks) == 0


# -- roles start from rbee.py's cached bytecode (role_argv) -----------------------------------------

def copy_of_rbee(directory):
    directory.mkdir()
    shutil.copy(RBEE, directory / "rbee.py")
    shutil.copytree(Path(RBEE).parent / "backends", directory / "backends")
    return directory / "rbee.py"


def test_a_role_runs_from_bytecode_that_its_first_start_writes(tmp_path):
    copy = copy_of_rbee(tmp_path / "app")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")   # (rbee.py's own cache is written all the same)
    for _ in range(2):
        out = subprocess.run(rbee.role_argv(["--version"], rbee_py=str(copy)), capture_output=True, text=True,
                             env=env, timeout=60)
        assert out.returncode == 0 and out.stdout.strip() == "rbee %s" % rbee.__version__, out.stderr
    cached = list((tmp_path / "app" / "__pycache__").glob("rbee.*.pyc"))
    assert len(cached) == 1
    argv = rbee.role_argv(["hive", "--lifeline"], rbee_py=str(copy))
    assert argv[-3:] == [str(copy), "hive", "--lifeline"]   # what ps shows: rbee.py and the role


def test_a_role_starts_where_its_bytecode_cannot_be_written(tmp_path):
    copy = copy_of_rbee(tmp_path / "app")
    (tmp_path / "app" / "__pycache__").write_text("a file where the cache directory would be")
    out = subprocess.run(rbee.role_argv(["--version"], rbee_py=str(copy)), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "rbee %s" % rbee.__version__, out.stderr
    assert (tmp_path / "app" / "__pycache__").is_file()


def test_a_port_someone_listens_on_is_passed_over():
    """bound_socket: the first free port from the start (a hive's worker's port), held once returned."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        taken = held.getsockname()[1]
        with rbee.bound_socket("127.0.0.1", taken) as sock:
            port = sock.getsockname()[1]
            assert port > taken
            with socket.socket() as other, pytest.raises(OSError):
                other.bind(("127.0.0.1", port))


def one_answer_server(answer, delay=0.0):
    """A listening socket on a free port that reads one request and sends `answer` after `delay` s; its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        with conn, server:
            conn.recv(65536)
            time.sleep(delay)
            with contextlib.suppress(OSError):
                conn.sendall(answer)
    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def test_an_answer_cut_short_is_the_hop_gone_not_a_half_read_json():
    port = one_answer_server(b'HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n{"embeddings": [[0.1')
    client = rbee.WorkerClient("http://127.0.0.1:%d" % port, "key", "worker-x", "mac")
    with pytest.raises(rbee.WorkerCrashed, match="ended after 20 of its 100 bytes"):
        client.embed({"input": ["x"]})


@pytest.mark.parametrize("when", ["while it waits", "before it connects"])
def test_a_client_cut_from_another_thread_ends_its_request_at_once(when):
    """What the queen does when a node goes: the request waiting on it fails now, not by its timeout."""
    port = one_answer_server(b'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}', delay=30)
    client = rbee.WorkerClient("http://127.0.0.1:%d" % port, "key", "worker-x", "mac")
    if when == "before it connects":
        client.cut()
    else:
        threading.Timer(0.3, client.cut).start()
    with pytest.raises(rbee.WorkerCrashed):   # (uncut, it would get its answer in 30 s)
        client.embed({"input": ["x"]})


@pytest.mark.parametrize("compiler, cflags", [("true", "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"), ("false", "")])
def test_a_nodes_build_leaves_out_amx_only_where_its_compiler_knows_the_flags(compiler, cflags):
    """`nodes install` builds ggml without the AMX kernels (they crash on some CPUs with AMX), but a
    compiler that refuses the flags (GCC 10, clang for arm64) must still build it, without them."""
    out = subprocess.run(["sh", "-c", "set -e; " + rbee.NO_AMX_SH + 'echo "$CFLAGS|$CXXFLAGS"'],
                         env=dict(os.environ, CC=compiler), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "%s|%s\n" % (cflags, cflags), out
