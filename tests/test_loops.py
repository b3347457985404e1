"""The three entry scripts each hold the whole training loop, so that a reader sees in the script itself what a run
logs, validates and saves; this keeps them from drifting apart (in the spirit of accelerate's
ExampleDifferenceTests). From `for epoch in range(` to `return metrics`, two scripts may differ only in lines that
each script marks as its own with a trailing `[tag]` comment: a fix carried to one loop and not the others fails."""

import difflib
import re

import pytest
import torch

from conftest import PROJECT, tiny_config

SCRIPTS = {"exp_1/main.py": {"one step per batch", "plain PyTorch"},
           "exp_2/main.py": {"accumulation", "plain PyTorch"},
           "exp_2/main_accelerate.py": {"accumulation", "accelerate"}}
TAG = re.compile(r"#.*\[([a-zA-Z ]+)\]\s*$")


def loop_lines(script: str, root=PROJECT) -> list[tuple[str, str | None]]:
    """(code without comments and indentation, tag or None) of each code line of the script's loop."""
    source = (root / script).read_text().splitlines()
    start = next(i for i, line in enumerate(source) if line.strip().startswith("for epoch in range("))
    end = next(i for i, line in enumerate(source) if line.strip() == "return metrics" and i > start)
    lines = []
    for line in source[start:end + 1]:
        tag = TAG.search(line)
        code = re.sub(r"\s+#.*$", "", line).strip() if "#" in line else line.strip()
        if code and not code.startswith("#"):
            lines.append((code, tag.group(1) if tag else None))
    return lines


def untagged_differences(a: str, b: str, root=PROJECT) -> list[str]:
    """Lines of `a` or `b` that the other lacks and that their own script does not mark as its own."""
    la, lb = loop_lines(a, root), loop_lines(b, root)
    matcher = difflib.SequenceMatcher(a=[code for code, _ in la], b=[code for code, _ in lb], autojunk=False)
    problems = []
    for kind, i1, i2, j1, j2 in matcher.get_opcodes():
        if kind == "equal":
            continue
        problems += [f"{a}: {code}" for code, tag in la[i1:i2] if tag is None]
        problems += [f"{b}: {code}" for code, tag in lb[j1:j2] if tag is None]
    return problems


@pytest.mark.parametrize("a, b", [("exp_1/main.py", "exp_2/main.py"), ("exp_2/main.py", "exp_2/main_accelerate.py"),
                                  ("exp_1/main.py", "exp_2/main_accelerate.py")])
def test_the_training_loops_differ_only_in_lines_marked_as_their_own(a, b):
    assert untagged_differences(a, b) == []


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_each_script_marks_only_its_own_kinds_of_lines(script):
    used = {tag for _, tag in loop_lines(script) if tag}
    assert used <= SCRIPTS[script], f"{script} uses tags {used - SCRIPTS[script]}, which are not its own"


def test_the_check_catches_a_fix_carried_to_one_loop_only(tmp_path):
    """A preemption check added after validation in one script only, or a line changed in one only, is found."""
    for name in SCRIPTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((PROJECT / name).read_text())
    accelerate = tmp_path / "exp_2" / "main_accelerate.py"
    text = accelerate.read_text()
    changed = text.replace("                state.resume_clock()\n", "                state.resume_clock()\n"
                           "                if Preemption.requested:\n                    raise Preempted(state.step)\n", 1)
    assert changed != text
    accelerate.write_text(changed)
    assert untagged_differences("exp_2/main.py", "exp_2/main_accelerate.py", tmp_path) == [
        "exp_2/main_accelerate.py: if Preemption.requested:", "exp_2/main_accelerate.py: raise Preempted(state.step)"]
    plain = tmp_path / "exp_2" / "main.py"
    plain.write_text(plain.read_text().replace("due = what_is_due(cfg, state.step, end_of_epoch)",
                                               "due = what_is_due(cfg, state.step, False)"))
    assert "exp_2/main.py: due = what_is_due(cfg, state.step, False)" in untagged_differences(
        "exp_1/main.py", "exp_2/main.py", tmp_path)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_the_host_waits_for_the_device_only_at_log_validation_and_save_points(script, tmp_path, tiny_bert,
                                                                               reviews_dir, monkeypatch):
    """The loss and gradient norm of each step reach the training state as device tensors, unread, and are read back
    in one transfer (TrainingState.read_back) only at the steps that log, validate or save: with log_every 4 and a
    validation at the epoch's end, 6 of 23 steps, not every step (which would stall a GPU at each)."""
    import importlib

    from accelerate.state import AcceleratorState, GradientState

    from imdb_grad_accum.loop import TrainingState

    read_at, unread = [], []
    read_back, step_done = TrainingState.read_back, TrainingState.step_done

    def read_back_and_note(self, *args, **kwargs):
        read_at.append(self.step)
        return read_back(self, *args, **kwargs)

    def step_done_and_check(self, loss, grad_norm, *args):
        unread.append(torch.is_tensor(loss) and torch.is_tensor(grad_norm))
        return step_done(self, loss, grad_norm, *args)

    monkeypatch.setattr(TrainingState, "read_back", read_back_and_note)
    monkeypatch.setattr(TrainingState, "step_done", step_done_and_check)
    config = tiny_config(tmp_path, tiny_bert, reviews_dir, train={"epochs": 1, "log_every": 4})
    args = ["--config", str(config)] + ([] if script == "exp_1/main.py" else ["train.grad_accum_steps=2",
                                                                                "train.batch_size=4"])
    AcceleratorState._reset_state(True), GradientState._reset_state()
    try:
        metrics = importlib.import_module(script.removesuffix(".py").replace("/", ".")).main(args)
    finally:
        AcceleratorState._reset_state(True), GradientState._reset_state()
    steps = metrics["optimizer_steps"]
    assert steps == 23 and unread == [True] * steps
    assert read_at == [4, 8, 12, 16, 20, 23]  # the epoch's end logs, validates and saves in one read
