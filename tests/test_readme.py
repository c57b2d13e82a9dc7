"""Every code block of the README runs as written.

Each ```python block runs in a fresh namespace, in its own temporary folder, on one thread, offline
(``HF_HUB_OFFLINE=1``). A block that continues from objects the README describes in prose (``model``,
``loader``, ``x``...) names a context in an HTML comment right before it; the context (below) builds
those objects, nothing more:

    <!-- test: lenet -->          model, loader, ... (see CONTEXTS)
    <!-- test: lenet slow -->     the same, run only with the slow tests (long training, big inputs)
    <!-- test: skip REASON -->    never run: only where running it is impossible, with the reason
    <!-- test: llm seq_len=2048->seq_len=64 -->   run with this text replaced (smaller sizes, same calls)

```bash blocks run their ``prunekit ...`` commands through the CLI in a subprocess (a usage synopsis,
with placeholders like ``MODEL_DIR`` or ``[--options]``, is checked against the command's ``--help``
instead); ```yaml blocks are the example recipes they abridge.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from prunekit import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]

FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: str  # the words of a preceding `<!-- test: ... -->`, or ""

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def words(self) -> list[str]:
        return self.marker.split()


def blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the test marker right before each (blank lines between
    are allowed)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = MARKER.match(lines[k]) if k >= 0 else None
        out.append(Block(doc, i + 1, start.group(1), "\n".join(lines[i + 1 : j]) + "\n", marker.group(1) if marker else ""))
        i = j + 1
    return out


ALL = [b for doc in DOCS if doc.exists() for b in blocks(doc)]


def params(lang: str) -> list:
    chosen = []
    for b in ALL:
        if b.lang != lang:
            continue
        marks = []
        if b.words[:1] == ["skip"]:
            marks.append(pytest.mark.skip(reason=" ".join(b.words[1:]) or "marked skip in the README"))
        if "slow" in b.words:
            marks.append(pytest.mark.slow)
        chosen.append(pytest.param(b, id=b.id, marks=marks))
    return chosen


# --- contexts: the objects the README's prose gives a block ------------------------------------------------


def lenet(tmp_path: Path, request) -> dict:
    """The session's trained LeNet-300-100 on digits (a copy) and everything a training loop around it has."""
    import torch.nn.functional as F
    from torch import nn

    import prunekit as pk
    from prunekit.data import evaluate
    from prunekit.models import LeNet300100

    loader, val_loader = request.getfixturevalue("digits_loaders")
    model = request.getfixturevalue("trained_lenet")
    saved = LeNet300100()
    pk.prune(saved, 0.9, scope="lamp")
    pk.save(saved, tmp_path / "lenet-90.safetensors")  # what the five-line example writes
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = next(iter(loader))
    return dict(torch=torch, nn=nn, F=F, pk=pk, LeNet300100=LeNet300100, model=model, fresh_model=LeNet300100(),
                loader=loader, val_loader=val_loader, evaluate=evaluate, optimizer=optimizer, opt=optimizer,
                sched=torch.optim.lr_scheduler.StepLR(optimizer, 10), x=x, y=y, example=x,
                steps_per_epoch=len(loader), total_steps=3 * len(loader),
                pruner=pk.Pruner(model, pk.schedules.OneShot(0.5, at=0)))


def resnet(tmp_path: Path, request) -> dict:
    """ResNet-20 on 32x32 images: example inputs ``x``, a small labelled ``loader`` and an optimizer."""
    import prunekit as pk
    from prunekit.data import loaders, synthetic_images
    from prunekit.models import resnet20

    torch.manual_seed(0)
    loader, _ = loaders(*synthetic_images(n=64, channels=3, size=32, classes=10, seed=0), batch_size=16, seed=0)
    model = resnet20()
    return dict(torch=torch, pk=pk, resnet20=resnet20, model=model, x=torch.randn(1, 3, 32, 32), loader=loader,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.01))


def word_tokenizer(text: str, size: int = 512):
    """A word-level tokenizer of the ``size - 1`` most frequent words of ``text`` plus ``[UNK]``: a small vocabulary
    keeps a tiny model's LM head (and so perplexity over the built-in text) cheap."""
    from collections import Counter

    import tokenizers
    import transformers as tf

    words = [w for w, _ in Counter(re.findall(r"\w+|[^\w\s]", text.lower())).most_common(size - 1)]
    model = tokenizers.models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = tokenizers.normalizers.Lowercase()
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[UNK]")


def llm(tmp_path: Path, request) -> dict:
    """A tiny random Llama (6 blocks, 8 heads, 512 words) saved with its tokenizer in ``path/to/model``, and
    ``calib``."""
    import prunekit as pk
    from prunekit.llm import hf
    from prunekit.llm.models import tiny_model

    tok = word_tokenizer((ROOT / "README.md").read_text(encoding="utf-8"))
    model = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=6, num_key_value_heads=8,
                       max_position_embeddings=2048)
    hf.save_pretrained(model, tmp_path / "path" / "to" / "model", tok)
    calib = pk.llm.calibration_data(tok, texts=[(ROOT / "README.md").read_text(encoding="utf-8")], num_samples=4,
                                    seq_len=32, seed=0)
    return dict(torch=torch, pk=pk, model=model, tok=tok, calib=calib)


CONTEXTS = {"lenet": lenet, "resnet": resnet, "llm": llm}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", params("python"))
def test_python_block_runs(block: Block, in_tmp, request):
    names = [w for w in block.words if w in CONTEXTS]
    replace = [w.split("->") for w in block.words if "->" in w]
    unknown = [w for w in block.words if w not in CONTEXTS and w != "slow" and "->" not in w]
    assert not unknown, f"{block.id}: unknown test marker word(s) {unknown}; contexts are {sorted(CONTEXTS)}"
    code = block.code
    for old, new in replace:
        assert old in code, f"{block.id}: the marker replaces {old!r}, which the block does not have"
        code = code.replace(old, new)
    namespace = {"__name__": "__readme__"}
    for name in names:
        namespace.update(CONTEXTS[name](in_tmp, request))
    code = "\n" * block.line + code  # tracebacks give the README's own line numbers
    exec(compile(code, str(block.doc), "exec"), namespace)  # noqa: S102 - the README is ours


# --- shell blocks ---------------------------------------------------------------------------------------------


def commands(code: str) -> list[str]:
    """The ``prunekit ...`` command lines of a shell block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.split("  #")[0].split(" # ")[0].strip() for line in joined.splitlines()
            if line.strip().startswith("prunekit ")]


def prunekit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "prunekit.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("block", [p for p in params("bash") if commands(p.values[0].code)])
def test_shell_block_runs(block: Block, in_tmp):
    shutil.copytree(ROOT / "examples", in_tmp / "examples")  # the README's paths are relative to the repository
    for command in commands(block.code):
        argv = shlex.split(command)[1:]
        if "[" in command or "..." in command or re.search(r"\b[A-Z][A-Z_]{2,}\b", command):
            # a synopsis (placeholders such as MODEL_DIR, [optional] parts): every option it shows is one the
            # command takes; the command itself is exercised by its own tests
            usage = io.StringIO()
            with contextlib.redirect_stdout(usage):
                assert cli.main([argv[0], "--help"]) == 0
            for option in re.findall(r"(--[a-z][a-z-]*)", command):
                assert re.search(rf"{option}\b", usage.getvalue()), f"{block.id}: `prunekit {argv[0]}` has no {option}"
            continue
        done = prunekit(*argv, cwd=in_tmp)
        assert done.returncode == 0, f"{block.id}: `{command}` failed:\n{done.stderr[-3000:]}"


# --- YAML blocks ------------------------------------------------------------------------------------------------


def _subset(small, big, where="") -> None:
    if isinstance(small, dict):
        assert isinstance(big, dict), where
        for key, value in small.items():
            assert key in big, f"{where}{key} is not in the example"
            _subset(value, big[key], f"{where}{key}.")
    else:
        assert small == big, f"{where[:-1]}: {small!r} in the README, {big!r} in the example"


@pytest.mark.parametrize("block", params("yaml"))
def test_yaml_block_is_the_example_it_abridges(block: Block):
    from prunekit.recipes import parse_recipe

    shown = yaml.safe_load(block.code)
    example = re.search(r"#\s*(examples/\S+\.yaml)", block.code)
    assert example, f"{block.id}: say which example file the YAML abridges (# examples/NAME.yaml)"
    full = yaml.safe_load((ROOT / example.group(1)).read_text(encoding="utf-8"))
    _subset(shown, full)
    parse_recipe(shown, base_dir=ROOT / "examples")  # valid on its own
