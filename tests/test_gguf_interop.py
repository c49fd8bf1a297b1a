"""llama.cpp's own converter (convert_hf_to_gguf.py) on `ctxext extend` outputs of the bundled
model, and the GGUF rope metadata it writes, read back with the ``gguf`` package.

The converter is not in this repository: it comes, pinned, from the llama-cpp-python sdist on
PyPI (which vendors llama.cpp: the script, its ``conversion`` package and ``gguf-py``), fetched
once with pip into pytest's cache folder. Set CTXEXT_LLAMA_CPP to a llama.cpp checkout to use
that instead. The tests skip, saying why, when neither can be had or gguf / sentencepiece (the
converter imports it for every Llama) is missing.

The bundled model's byte-level BPE tokenizer is refused by the converter ("BPE pre-tokenizer was
not recognized": llama.cpp knows tokenizers by a hash of their output), so the model converted
here carries a small SentencePiece ``tokenizer.model`` as Llama 2 checkpoints do; its rope config
is exactly what `ctxext extend` wrote. See docs/interop.md for what llama.cpp does with each key.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import BUNDLED

from ctxext.cli.app import main
from ctxext.rope.formulas import ntk_theta, reference_inv_freq, rescale_factors

gguf = pytest.importorskip("gguf")
spm = pytest.importorskip("sentencepiece")

pytestmark = pytest.mark.slow

LLAMA_CPP_PYTHON = "0.3.36"  # llama.cpp as vendored by this llama-cpp-python release
TRAINED, FACTOR, EXTENDED = 256, 4.0, 1024  # the bundled model's length, x4
THETA, ROTARY_DIM = 10000.0, 64

#: `ctxext extend` arguments of each case (after the model and output folder).
CASES: dict[str, list[str]] = {
    "yarn": ["-m", "yarn", "-f", "4"],
    "yarn-options": [
        *("-m", "yarn", "-f", "4"),
        *("--beta-fast", "16", "--beta-slow", "2", "--attention-factor", "1.25"),
    ],
    "linear": ["-m", "linear", "-f", "4"],
    "ntk": ["-m", "ntk", "-f", "4"],
    "llama3": ["-m", "llama3", "-f", "4"],
    "dynamic": ["-m", "dynamic", "-f", "4"],
}

# GGUF keys as llama.cpp names them (gguf-py's constants.py) for the llama architecture
_CONTEXT = "llama.context_length"
_YARN = {
    "llama.rope.scaling.type": "yarn",
    "llama.rope.scaling.factor": FACTOR,
    "llama.rope.scaling.original_context_length": TRAINED,
    "llama.rope.freq_base": THETA,
    _CONTEXT: EXTENDED,
}
_UNSCALED = {"llama.rope.freq_base": THETA}

#: The rope metadata each case must convert to (context length included; rope_freqs apart).
EXPECTED: dict[str, dict[str, object]] = {
    "yarn": {
        **_YARN,
        "llama.rope.scaling.yarn_beta_fast": 32.0,
        "llama.rope.scaling.yarn_beta_slow": 1.0,
    },
    "yarn-options": {
        **_YARN,
        "llama.rope.scaling.yarn_beta_fast": 16.0,
        "llama.rope.scaling.yarn_beta_slow": 2.0,
        "llama.rope.scaling.yarn_attn_factor": 1.25,
    },
    # max_position_embeddings stays the trained length for linear (vLLM and SGLang serve it x
    # factor), and llama.cpp takes it as its default context: there, pass -c 1024
    "linear": {
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": FACTOR,
        "llama.rope.freq_base": THETA,
        _CONTEXT: TRAINED,
    },
    # a larger base, no scaling
    "ntk": {
        "llama.rope.freq_base": float(np.float32(ntk_theta(THETA, ROTARY_DIM, FACTOR))),
        _CONTEXT: EXTENDED,
    },
    # no scaling keys: the per-pair divisors travel as the rope_freqs tensor
    "llama3": {**_UNSCALED, _CONTEXT: EXTENDED},
    # dropped: llama.cpp runs the model unscaled at the trained length
    "dynamic": {**_UNSCALED, _CONTEXT: TRAINED},
}


# --------------------------------------------------------------------------- the converter


_SPEC = f"llama-cpp-python=={LLAMA_CPP_PYTHON}"


@dataclass
class _Download:
    """``pip download`` of the pinned sdist into a temporary folder, running."""

    proc: subprocess.Popen
    folder: tempfile.TemporaryDirectory

    @classmethod
    def start(cls) -> _Download:
        folder = tempfile.TemporaryDirectory()
        cmd = [sys.executable, "-m", "pip", "download", _SPEC, "--no-deps", "--no-binary", ":all:"]
        proc = subprocess.Popen(
            [*cmd, "-q", "-d", folder.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return cls(proc, folder)

    def stop(self) -> None:
        """Kill it if it still runs and remove its folder (again: nothing)."""
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.communicate()
        self.folder.cleanup()


#: The download started when the tests were collected (see :func:`start_converter_download`).
_started: _Download | None = None


def _cache_root(config: pytest.Config) -> Path | None:
    cache = getattr(config, "cache", None)  # None with -p no:cacheprovider
    return Path(cache.mkdir("llama-cpp")) if cache else None


def _script(cache: Path) -> Path:
    return cache / f"llama-cpp-python-{LLAMA_CPP_PYTHON}" / "convert_hf_to_gguf.py"


def start_converter_download(config: pytest.Config) -> None:
    """Called once the session's tests are collected, when this module's are among them (see
    conftest.py): the converter's download (a few seconds of network) starts at once and runs
    while the tests before this module's run, unless a converter is given or cached."""
    global _started
    cache = _cache_root(config)
    if os.environ.get("CTXEXT_LLAMA_CPP") or (cache and _script(cache).is_file()) or _started:
        return
    _started = _Download.start()
    atexit.register(_started.stop)  # the module's tests may never run (-x, an interrupt)


def _converter_from_pip(cache: Path) -> Path:
    """convert_hf_to_gguf.py with conversion/ and gguf-py/ out of the pinned sdist."""
    global _started
    script = _script(cache)
    download, _started = _started, None
    try:
        if script.is_file():
            return script
        download = download or _Download.start()
        try:
            _, stderr = download.proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            pytest.skip(f"pip download {_SPEC} took over 15 minutes")
        tmp = Path(download.folder.name)
        sdists = list(tmp.glob("*.tar.gz"))
        if download.proc.returncode != 0 or not sdists:
            why = (stderr.strip().splitlines() or ["no sdist"])[-1]
            pytest.skip(f"llama.cpp's converter unavailable: pip download {_SPEC}: {why}")
        _extract_converter(sdists[0], tmp / "llama.cpp")
        if not script.is_file():  # another session may have been quicker
            shutil.move(tmp / "llama.cpp", script.parent)
    finally:
        if download is not None:
            download.stop()
    return script


def _extract_converter(sdist: Path, dest: Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            name = member.name.removeprefix(prefix)
            if (
                name != member.name
                and name.startswith(keep)
                and (member.isfile() or member.isdir())
            ):
                member.name = name
                members.append(member)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: no paths outside dest
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - older Pythons; members are plain files under the prefix
            tar.extractall(dest, members=members)


@pytest.fixture(scope="module")
def converter(pytestconfig, tmp_path_factory) -> Path:
    if checkout := os.environ.get("CTXEXT_LLAMA_CPP"):
        script = Path(checkout) / "convert_hf_to_gguf.py"
        if not script.is_file():
            pytest.skip(f"CTXEXT_LLAMA_CPP={checkout} has no convert_hf_to_gguf.py")
        return script
    return _converter_from_pip(_cache_root(pytestconfig) or tmp_path_factory.mktemp("llama-cpp"))


# --------------------------------------------------------------------------- extend + convert

# Runs the converter as `python convert_hf_to_gguf.py MODEL --outfile OUT` once per model, in one
# process so torch and transformers are imported once.
_DRIVER = """
import runpy, sys
script, *pairs = sys.argv[1:]
sys.path.insert(0, script.rsplit("/", 1)[0])
for model, out in zip(pairs[::2], pairs[1::2]):
    sys.argv = [script, model, "--outfile", out, "--outtype", "f32"]
    runpy.run_path(script, run_name="__main__")
"""


def _llama_with_sentencepiece(folder: Path) -> Path:
    """The bundled model plus a SentencePiece tokenizer.model (see the module docstring)."""
    shutil.copytree(BUNDLED, folder)
    lines = [
        line
        for p in sorted(Path(BUNDLED.parents[1], "rope").glob("*.py"))
        for line in p.read_text().splitlines()
        if line.strip()
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=300,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


def _extend(source: Path, out: Path, args: list[str]) -> str:
    """`ctxext extend` through the real entry point; returns what it printed on stderr."""
    err = io.StringIO()
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as done,
    ):
        main(["extend", str(source), "-o", str(out), *args])
    assert done.value.code == 0, err.getvalue()
    return err.getvalue()


@pytest.fixture(scope="module")
def converted(converter, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("gguf")
    source = _llama_with_sentencepiece(root / "stdlib-llama-sp")
    cases: dict[str, dict] = {}
    pairs: list[str] = []
    for name, args in CASES.items():
        out = root / name
        cases[name] = {"stderr": _extend(source, out, args), "gguf": root / f"{name}.gguf"}
        cases[name]["config"] = json.loads((out / "config.json").read_text())
        pairs += [str(out), str(cases[name]["gguf"])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(converter), *pairs],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for case in cases.values():
        reader = gguf.GGUFReader(case["gguf"])
        case["fields"] = {k: f.contents() for k, f in reader.fields.items()}
        case["tensors"] = {t.name: np.array(t.data) for t in reader.tensors}
    cases["_log"] = {"converter": done.stderr}
    return cases


def _rope_metadata(fields: dict) -> dict:
    """The keys llama.cpp reads for positions: rope.* (but the head size) and the context."""
    dims = "llama.rope.dimension_count"
    return {k: v for k, v in fields.items() if (".rope." in k and k != dims) or k == _CONTEXT}


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(CASES))
def test_gguf_rope_keys(converted, name: str) -> None:
    got = _rope_metadata(converted[name]["fields"])
    want = EXPECTED[name]
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key, value in want.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-7), key  # float32 in the file
        else:
            assert got[key] == value, key
    assert converted[name]["fields"]["llama.rope.dimension_count"] == ROTARY_DIM


@pytest.mark.parametrize("name", list(CASES))
def test_llama3_divisors_travel_as_rope_freqs(converted, name: str) -> None:
    tensors = converted[name]["tensors"]
    if name != "llama3":
        assert "rope_freqs.weight" not in tensors
        return
    inv, _ = reference_inv_freq("llama3", THETA, ROTARY_DIM, FACTOR, TRAINED)
    want = rescale_factors(inv, THETA, ROTARY_DIM)  # 1 kept ... s divided, per pair
    np.testing.assert_allclose(tensors["rope_freqs.weight"], want, rtol=1e-6, atol=0)
    assert want[0] == 1.0 and want[-1] == FACTOR  # both ends of the blend are in the tensor


def _warnings(case: dict) -> list[str]:
    return [line for line in case["stderr"].splitlines() if line.startswith("warning:")]


def test_extend_warned_of_what_llama_cpp_drops(converted) -> None:
    case = converted["dynamic"]
    assert case["config"]["rope_parameters"]["rope_type"] == "dynamic"  # written...
    assert "llama.rope.scaling.type" not in case["fields"]  # ...and not converted
    (warning,) = _warnings(case)
    assert "llama.cpp ignores it" in warning and f"{TRAINED}-token context" in warning
    # the YaRN options reach the GGUF (test_gguf_rope_keys) but llama.cpp's loader reads them
    # back for Grok and Mistral 3 only (src/llama-model.cpp)
    (warning,) = _warnings(converted["yarn-options"])
    assert "llama.cpp (Llama models) and TGI ignore beta_fast, beta_slow, attention_factor" in (
        warning
    )
    for name in CASES:
        if name not in ("dynamic", "yarn-options"):
            assert _warnings(converted[name]) == [], name


def test_converter_reads_the_config_without_rope_warnings(converted) -> None:
    """transformers 4.x (what llama.cpp's requirements pin) warned on every load while the
    rope_scaling mirror carried rope_theta; 5.x never does. Only the ntk case's "default" type
    is unknown to the converter itself (it writes no scaling for it, which is right)."""
    log = converted["_log"]["converter"]
    assert "Unrecognized keys" not in log
    assert log.count("Unknown RoPE type") == log.count("Unknown RoPE type: default") == 1
