"""The keeper as a user sees it on a terminal: text and narration on one pseudo-terminal (a real
pty, both stdout and stderr on it, as in an interactive shell), against the same command with
stdout redirected."""
import os
import pty
import re
import subprocess

from conftest import PY, RBEE, assert_no_rbee_left, run_rbee

PROMPT = "Once upon a time, in a small village by the sea, there lived"
NARRATION_LINE = re.compile(r"^\[[a-z]+(?:-[a-z]+)*\] .*\n", re.M)   # `[actor] ...`, a line of its own
NARRATION_ANYWHERE = re.compile(r"\[(?:rbee-keeper|queen-rbee|rbee-hive|http-server|llm-worker-rbee|device-manager|"
                                r"model-loader|model-provisioner|tokenizer|llama-backend)\] ")


def run_on_a_pty(args, env, timeout=180):
    """`rbee.py ARGS` with stdout and stderr on one new pty; returns (exit code, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([PY, RBEE] + args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout), b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def text_of(pieces, target):
    """Whether the text pieces between narration lines make up `target`, where the line break
    that ends a piece may be one rbee inserted before the narration line that follows it."""
    def match(i, pos):
        if i == len(pieces):
            return pos == len(target)
        options = [pieces[i]]
        if i < len(pieces) - 1 and pieces[i].endswith("\n"):
            options.append(pieces[i][:-1])
        return any(target.startswith(o, pos) and match(i + 1, pos + len(o)) for o in options)
    return match(0, 0)


def test_narration_on_a_shared_terminal_starts_at_column_0_and_leaves_the_text_whole(env, model_path, tmp_path):
    args = ["infer", "--node", "localhost", "--model", "file:" + model_path, "--prompt", PROMPT,
            "--max-tokens", "48", "--temperature", "0", "--raw"]
    redirected = run_rbee(args, env)
    assert redirected.returncode == 0, redirected.stderr
    text = redirected.stdout
    assert len(text) > 100 and not NARRATION_ANYWHERE.search(text)      # stdout: the text alone

    code, screen = run_on_a_pty(args, env)
    assert code == 0, screen
    assert_no_rbee_left(str(tmp_path))
    # every narration line starts at column 0: no line carries one after other text
    for line in screen.split("\n"):
        assert not NARRATION_ANYWHERE.search(line[1:]), (line, screen)
    # the worker's "Generated 10 tokens" arrived while the text's line was open: on its own line
    generated = [m.start() for m in re.finditer(r"^\[llama-backend\] 🎯 Generated \d+ tokens$", screen, re.M)]
    assert len(generated) >= 3, screen
    pieces = NARRATION_LINE.split(screen)
    first_text = next(i for i, p in enumerate(pieces) if p.strip())
    assert any(p.strip() for p in pieces[first_text + 2:]), "narration inside the text expected: %r" % screen
    # the text read off the terminal, without the narration lines, is the redirected stdout
    assert text_of(pieces, text) or text_of(pieces, text + "\n"), (pieces, text)


def test_text_ends_its_line_before_the_prompt_only_on_a_terminal(env, model_path):
    """Redirected, stdout is exactly the text (no newline added); on a pty the line is ended."""
    args = ["infer", "--node", "localhost", "--model", "file:" + model_path, "--prompt", PROMPT,
            "--max-tokens", "5", "--temperature", "0", "--raw", "--quiet"]
    redirected = run_rbee(args, env)
    assert redirected.returncode == 0 and redirected.stdout and not redirected.stdout.endswith("\n")
    code, screen = run_on_a_pty(args, env)
    assert code == 0 and screen == redirected.stdout + "\n", (screen, redirected.stdout)
