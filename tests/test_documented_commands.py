"""Every command the documentation shows works as written.

Commands are read from README.md, docs/*.md, datasets/README.md and the tools' own docstrings (``bash`` blocks and
inline code). Each one of ours is checked by how much it costs:

- **run**: the cheap ones (demo configs, ``--device cpu``) run for real, with overrides that only make them short;
- **parse**: the others (GPUs, downloads, real datasets) are parsed by the program's own argument parser and, for
  ``train_net.py``, their config is built (file, keys, values, ALGM layers against the depth);
- ``--help`` of every program answers;
- shell scripts the docs name exist and pass ``bash -n``; other programs (pip, tar, sbatch, ...) are not ours and
  are only listed.
A command no rule knows fails ``test_every_documented_command_has_a_rule``: a new kind of command needs a rule here.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "datasets" / "README.md"]
PROGRAM_DOCSTRINGS = [ROOT / "train_net.py", *sorted((ROOT / "tools").glob("*.py"))]
DEMO = "configs/demo/segmenter_tiny_algm.yaml"
# placeholder words of the docs -> a value the parsers accept
PLACEHOLDERS = {"CONFIG": DEMO, "X.yaml": DEMO, "cfg.yaml": DEMO, "M": "2", "r": "0", "MACHINE0": "10.0.0.1"}
# programs that are not ours: listed, not run
EXTERNAL = ("pip", "cd", "unzip", "tar", "export", "tensorboard", "srun", "deepspeed", "git")
# what "short" means for a documented command that runs for real
SHORT_TRAIN = ["SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.LOG_PERIOD", "1",
               "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST_MAX_IMAGES", "4", "TEST.FLOPS_NUM_IMAGES", "1",
               "TEST.TIMER_WARMUP_BATCHES", "1", "TEST.TENSORBOARD_IMAGES", "1"]
# datasets/README.md's script that registers a dataset from Python and runs train_net.py's main
RECIPE = "my_train_net.py"
# Mask2Former's train_net with the bridged modules (docs/DETECTRON2.md): detectron2's argument parser
D2_TRAIN_NET = "tools/d2_train_net.py"
# tools that need a CUDA GPU and detectron2 (checked to exist; their CPU copies run in their own tests)
GPU_ONLY = ("tools/d2_gpu_check.py",)
SHORT_TOOL = {"benchmark_eva.py": ["--warmup", "0", "--iters", "1", "--no-flops"]}


def shell_lines(text: str) -> List[str]:
    """The commands of a markdown text: lines of ```bash blocks (continuations joined, comments dropped) and inline
    code spans that start with a program."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = "" if line.strip().startswith("#") else re.split(r"\s+#\s", line)[0].strip()
            if line:
                commands.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if span.startswith(("python ", "tools/launch", "sbatch ", "torchrun ")) and " " in span:
            commands.append(span)
    return commands


def docstring_commands(path: Path) -> List[str]:
    """``python ...`` example lines of a program's module docstring (continuations joined)."""
    text = path.read_text()
    match = re.search(r'"""(.*?)"""', text, flags=re.S)
    joined = re.sub(r"\\\n\s*", " ", match.group(1)) if match else ""
    return [line.strip().split(" # ")[0].strip() for line in joined.splitlines()
            if line.strip().startswith("python ")]


def documented_commands() -> List[Tuple[str, str]]:
    found = [(doc.relative_to(ROOT).as_posix(), command) for doc in DOCS for command in shell_lines(doc.read_text())]
    found += [(path.relative_to(ROOT).as_posix(), command) for path in PROGRAM_DOCSTRINGS
              for command in docstring_commands(path)]
    unique: Dict[str, str] = {}
    for where, command in found:
        unique.setdefault(command, where)
    return [(where, command) for command, where in unique.items()]


def concrete_argv(words: List[str]) -> List[str]:
    """Placeholders made concrete: ``{a,b}`` -> a, ``[optional ...]`` dropped, CONFIG & co. (``PLACEHOLDERS``)."""
    text = re.sub(r"\[[^\]]*\]", "", " ".join(words))
    out = []
    for word in text.split():
        out.append(PLACEHOLDERS.get(word, re.sub(r"\{([^,{}]+),[^{}]*\}", r"\1", word)))
    return out


def classify(command: str) -> Tuple[str, str, List[str]]:
    """(kind, program, argv): kind is "train_net", "d2_train_net", "tool", "recipe", "script", "external", "test" or
    "unknown"."""
    command = re.sub(r"<[^<>]*>", "placeholder", command)  # <ImageNet weights>, <photos>
    words = shlex.split(command.rstrip("&").strip(), posix=True)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    first = words[0]
    if first == "python" and words[1] == "-m" and words[2] == "pytest":
        return "test", "pytest", words[3:]
    if first == "python" and words[1] == "-c":
        return "external", "python -c", []
    if first == "torchrun":
        script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
        if script is None:  # a mention of the launcher's flags, not a command
            return "external", first, []
        return "train_net", words[script], words[script + 1:]
    if first == "python" and words[1] == RECIPE:
        return "recipe", RECIPE, words[2:]
    if first == "python" and words[1] in GPU_ONLY:
        return "script", words[1], []
    if first == "python" and words[1] == D2_TRAIN_NET:  # detectron2's own argument parser and launcher
        return "d2_train_net", D2_TRAIN_NET, words[2:]
    if first == "python":
        program = words[1]
        return ("train_net" if program == "train_net.py" else "tool"), program, words[2:]
    if first == "bash" and len(words) > 1 and words[1].startswith("tools/") and words[1].endswith(".sh"):
        return "script", words[1], []
    if first.startswith("("):  # a subshell step of a third-party build (Mask2Former's op)
        return "external", first, []
    if first == "sbatch":
        return "script", next(w for w in words if w.startswith("tools/")), []
    if first.startswith("tools/") and first.endswith(".sh"):
        return "script", first, []
    if first in EXTERNAL:
        return "external", first, []
    return "unknown", first, words[1:]


COMMANDS = documented_commands()


def by_kind(kind: str) -> List[Tuple[str, str]]:
    return [(where, command) for where, command in COMMANDS if classify(command)[0] == kind]


def is_cheap_train(command: str) -> bool:
    """Demo config, this machine, one process, not part of a two-command recipe."""
    return ("configs/demo/" in command and "--num-gpus" not in command and "--num-machines" not in command
            and "MODEL.DEVICE cuda" not in command and not command.startswith("torchrun"))


def test_every_documented_command_has_a_rule():
    unknown = [f"{where}: {command}" for where, command in COMMANDS if classify(command)[0] == "unknown"]
    assert not unknown, f"no rule in {Path(__file__).name} for these documented commands: {unknown}"
    kinds = {classify(command)[0] for _, command in COMMANDS}
    assert {"train_net", "tool", "script", "recipe"} <= kinds and len(COMMANDS) > 40


class Parsed(Exception):
    """Raised instead of running a program once its arguments are parsed."""


def parse_only(monkeypatch, main, argv: List[str]) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    with pytest.raises(Parsed) as parsed:
        main(argv)
    monkeypatch.undo()
    return parsed.value.args[0]


def load_program(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("where, command", by_kind("train_net"), ids=lambda value: value[:90])
def test_train_net_commands_parse_and_build_their_config(where, command):
    from algm_d2.config import get_cfg
    from algm_d2.engine import default_argument_parser, load_config
    from algm_d2.modeling import algm_config_from_cfg

    _, _, argv = classify(command)
    args = default_argument_parser().parse_args(concrete_argv(argv))
    written = [c for _, c in COMMANDS if f"--write-config {args.config_file}" in c]
    if written and not Path(args.config_file).is_file():
        pytest.skip(f"{args.config_file} is written by the documented command {written[0]!r}")
    # GPU commands are built as configs here; the device is the only thing this machine changes
    args.opts = [*(args.opts or []), "MODEL.DEVICE", "cpu"]
    cfg = load_config(args)
    assert get_cfg().keys() == cfg.keys()
    algm_config_from_cfg(cfg).check_depth(cfg.MODEL.BACKBONE.DEPTH)


@pytest.mark.parametrize("where, command", by_kind("d2_train_net"), ids=lambda value: value[:90])
def test_detectron2_train_net_commands_parse_and_name_existing_configs(where, command):
    pytest.importorskip("detectron2", reason="detectron2 is not installed (docs/DETECTRON2.md)")
    from detectron2.engine import default_argument_parser as d2_argument_parser

    argv = classify(command)[2]
    if "..." in argv:  # an elided command: only its program is checked
        return
    args = d2_argument_parser().parse_args(concrete_argv(argv))
    assert (ROOT / args.config_file).is_file(), f"{where}: {args.config_file} does not exist"


@pytest.mark.parametrize("where, command", by_kind("tool"), ids=lambda value: value[:90])
def test_tool_commands_parse(monkeypatch, where, command):
    _, program, argv = classify(command)
    path = ROOT / program
    assert path.is_file(), f"{where}: {program} does not exist"
    if "..." in argv:  # an elided command (" --variant large ... --mfu"): only its program is checked
        return
    parse_only(monkeypatch, load_program(path).main, concrete_argv(argv))


def programs() -> List[str]:
    named = {classify(command)[1] for _, command in by_kind("tool")}
    return sorted({"train_net.py", *named, *(p.relative_to(ROOT).as_posix() for p in (ROOT / "tools").glob("*.py")),
                   *(p.relative_to(ROOT).as_posix() for p in (ROOT / "datasets").glob("prepare_*.py"))})


@pytest.mark.parametrize("program", programs())
def test_help_answers_without_loading_deepspeed(program):
    probe = ("import runpy, sys; sys.argv = [{0!r}, '--help']\n"
             "try:\n    runpy.run_path({0!r}, run_name='__main__')\nexcept SystemExit as end:\n"
             "    assert end.code in (0, None), end.code\n"
             "print('loaded:', sorted(m for m in ('torch', 'deepspeed', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe.format(str(ROOT / program))], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout
    assert "deepspeed" not in result.stdout.splitlines()[-1]
    if program in LAZY_PROGRAMS:
        assert result.stdout.splitlines()[-1] == "loaded: []", "--help imported torch before parsing"


# programs whose --help must not import torch at all
LAZY_PROGRAMS = {"train_net.py", "tools/calibrate_thresholds.py", "tools/demo_quality_study.py", "tools/benchmark.py",
                 "tools/benchmark_eva.py", "tools/benchmark_msda.py", "tools/benchmark_decode_tail.py",
                 "datasets/prepare_ade20k.py", "datasets/prepare_coco_stuff.py", "datasets/prepare_cityscapes.py",
                 "datasets/prepare_pcontext.py"}


@pytest.mark.parametrize("where, command", by_kind("script"), ids=lambda value: value[:90])
def test_documented_scripts_exist_and_parse(where, command):
    _, script, _ = classify(command)
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    check = [sys.executable, "-m", "py_compile"] if script.endswith(".py") else ["bash", "-n"]
    subprocess.run([*check, str(ROOT / script)], check=True, timeout=60)


@pytest.mark.parametrize("where, command", by_kind("test"), ids=lambda value: value[:90])
def test_documented_test_paths_exist(where, command):
    _, _, argv = classify(command)
    for path in (word.split("::")[0] for word in argv if not word.startswith("-")):
        assert (ROOT / path).exists(), f"{where}: {path} does not exist"


CHEAP_TRAIN = [(where, command) for where, command in by_kind("train_net") if is_cheap_train(command)]


@pytest.mark.parametrize("where, command", CHEAP_TRAIN, ids=lambda value: value[:90])
def test_cheap_train_net_commands_run(tmp_path, where, command):
    """The command as written (plus overrides that shorten it), on a fresh machine: no C++ build (an empty
    extension cache stays empty), no DeepSpeed accelerator warnings, no uncounted ops, a results table."""
    _, _, argv = classify(command)
    extensions = tmp_path / "torch_extensions"
    result = subprocess.run(
        [sys.executable, "train_net.py", *concrete_argv(argv), *SHORT_TRAIN, "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(ROOT)})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "| demo_shapes_val |" in result.stdout
    assert not extensions.exists(), "DeepSpeed compiled a C++ op"
    for noise in ("Setting accelerator to CPU", "No CUDA runtime is found", "ops counted as 0", "built successfully"):
        assert noise not in output
    assert "CPU thread" in (tmp_path / "out" / "log.txt").read_text()
    saved = json.loads((tmp_path / "out" / "inference" / "results.json").read_text())["demo_shapes_val"]
    assert saved["tokens"]["num_images"] == 4  # DATASETS.TEST_MAX_IMAGES


CHEAP_TOOLS = [(where, command) for where, command in by_kind("tool") if "--device cpu" in command]


@pytest.mark.parametrize("where, command", CHEAP_TOOLS, ids=lambda value: value[:90])
def test_cheap_tool_commands_run(tmp_path, monkeypatch, where, command):
    _, program, argv = classify(command)
    if program != "tools/benchmark_eva.py":
        where_tested = ("tests/analysis/test_quality_study.py" if program == "tools/demo_quality_study.py"
                        else "tests/test_tools.py")
        pytest.skip(f"{program} runs on the CPU in {where_tested}")
    monkeypatch.chdir(tmp_path)  # the tool writes its report into the current directory
    load_program(ROOT / program).main([*(a if not a.startswith("configs/") else str(ROOT / a)
                                         for a in concrete_argv(argv)), *SHORT_TOOL["benchmark_eva.py"]])
    report = json.loads((tmp_path / "benchmark_eva.json").read_text())
    assert set(report["results"]) == {"baseline", "algm_min", "algm_per_image", "scored_nothing_merged",
                                      "algm_25_30", "algm_50_50"}


def test_dataset_registered_from_python_trains_through_train_net(tmp_path):
    """datasets/README.md's my_train_net.py, as written, on a generated image and label map in place of /data/my."""
    import numpy as np
    from PIL import Image

    text = (ROOT / "datasets" / "README.md").read_text()
    (script,) = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)
                 if block.startswith(f"# {RECIPE}")]
    (command,) = [command for _, command in by_kind("recipe")]
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / "img_0001.jpg")
    Image.fromarray(rng.integers(0, 3, (64, 64), dtype=np.uint8)).save(data / "lbl_0001.png")
    (tmp_path / RECIPE).write_text(script.replace("/data/my", str(data)))
    _, _, argv = classify(command)
    short = ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "1", "DATALOADER.NUM_WORKERS", "0",
             "INPUT.CROP_SIZE", "(64, 64)", "INPUT.IMAGE_SCALE", "(128, 64)"]
    result = subprocess.run([sys.executable, str(tmp_path / RECIPE), *concrete_argv(argv), *short, "OUTPUT_DIR",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert "training data: my_train, 1 records" in (tmp_path / "out" / "log.txt").read_text()
    assert (tmp_path / "out" / "model_final.pth").is_file()
