"""Break each promise on purpose, one product change at a time, and check that its guarding fast test fails.

    python tests/sabotage.py          # every sabotage (a few minutes on 2 cores)
    python tests/sabotage.py 0 5      # some of them, by number

Works on a copy of the checkout's files in a temporary folder (no real IMDB files beside it, so only the synthetic
tests guard), and prints CAUGHT or NOT CAUGHT per sabotage: the table in tests/README.md.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
SABOTAGES = [
 ("accumulation: the smaller last step", "imdb_grad_accum/batching.py",
  "weight = 1.0 / len(window)", "weight = 1.0 / self.effective_batch",
  "tests/test_accumulation.py::test_accumulated_window_has_the_gradient_of_one_big_batch"),
 ("accumulation: across processes", "exp_2/main_accelerate.py",
  "accelerator.backward(loss * accelerator.gradient_accumulation_steps * accelerator.num_processes)",
  "accelerator.backward(loss * accelerator.gradient_accumulation_steps)",
  "tests/test_accumulation.py::test_two_processes_accumulate_the_gradient_of_one_big_batch"),
 ("resume: the schedule", "imdb_grad_accum/resume.py",
  "self.scheduler.load_state_dict(trainer[\"scheduler\"])", "pass",
  "tests/test_resume.py::test_kills_aimed_at_training_a_validation_a_point_and_the_test_each_resumed_end_exactly"),
 ("resume: the RNG", "imdb_grad_accum/resume.py",
  "_set_rng_states(load_file(folder / f\"rng_{self.process_index}.safetensors\"))", "pass",
  "tests/test_resume.py::test_kills_aimed_at_training_a_validation_a_point_and_the_test_each_resumed_end_exactly"),
 ("one writer", "imdb_grad_accum/lock.py",
  "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
  "tests/test_resume.py::test_two_simultaneous_starts_of_one_run_let_exactly_one_train"),
 ("bad input: one line", "imdb_grad_accum/cli.py",
  'print(f"error: {err}", file=sys.stderr)', 'print(f"error: {err}", file=sys.stderr); print("see --help")',
  "tests/test_bad_input.py"),
 ("bad input: nothing written", "imdb_grad_accum/data.py",
  'def prepare_data(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, columns: list[str]) -> Splits:',
  'def prepare_data(cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, columns: list[str]) -> Splits:\n'
  '    Path(cfg.output_dir, cfg.name).mkdir(parents=True, exist_ok=True)',
  "tests/test_bad_input.py"),
 ("--overwrite deletes only what the run recorded", "imdb_grad_accum/writer.py",
  "recorded, wholes = self.recorded(), self._wholes()",
  "recorded, wholes = self.recorded() | {str(p.relative_to(self.path)) for p in self.path.rglob('*')}, "
  "self._wholes()",
  "tests/test_ownership.py"),
 ("export deletes only a previous export", "imdb_grad_accum/export.py",
  "        if not is_export(out):\n", "        if False:\n",
  "tests/test_ownership.py::test_export_never_deletes_a_folder_it_did_not_make tests/test_export.py"),
 ("results replace only their own folders", "imdb_grad_accum/results.py",
  "if p.name not in RESULT_FILES or not p.is_file()", "if False",
  "tests/test_ownership.py::test_results_write_outside_runs_and_replace_only_their_own_folders tests/test_results.py"),
 ("leak-free split: test is not validation", "imdb_grad_accum/data.py",
  "np.split(rows, [n_val, n_val + n_test])", "[rows[:n_val], rows[:n_val], rows[n_val + n_test:]]",
  "tests/test_data.py"),
 ("leak-free split: duplicates dropped", "imdb_grad_accum/data.py",
  "        first = first_seen.setdefault(text, i)\n", "        first = first_seen.setdefault(text + str(i), i)\n",
  "tests/test_data.py"),
 ("comparisons only on the same reviews", "imdb_grad_accum/comparisons.py",
  "if a.reviews is None or a.reviews != b.reviews:", "if a.reviews is None and b.reviews is None:",
  "tests/test_results.py tests/test_evaluate.py"),
 ("evaluate leaves out what a run saw", "imdb_grad_accum/evaluate.py",
  "unseen = np.array([i for i in found[\"unique\"] if texts[i] not in seen], dtype=np.int64)",
  "unseen = np.array(found[\"unique\"], dtype=np.int64)", "tests/test_evaluate.py"),
 ("evaluate replaces only its own folder", "imdb_grad_accum/evaluate.py",
  "if foreign or (out.exists() and not out.is_dir()):", "if False:",
  "tests/test_evaluate.py::test_an_out_folder_holding_a_users_file_is_refused_and_kept"),
]


def main(only: list[str]) -> int:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                           capture_output=True, text=True, check=True).stdout.split()
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "project")
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, root / name)
        env = {**os.environ, "PYTHONPATH": str(root)}
        env.pop("IMDB_DATA", None), env.pop("ACLIMDB_DATA", None)
        for i, (promise, file, old, new, tests) in enumerate(SABOTAGES):
            if only and str(i) not in only:
                continue
            path = root / file
            text = path.read_text()
            if old not in text:
                print(f"[{i}] {promise}: DOES NOT APPLY ({old[:60]!r} is not in {file}); update the sabotage")
                missed += 1
                continue
            path.write_text(text.replace(old, new, 1))
            start = time.time()
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                                     *tests.split()], cwd=root, env=env, capture_output=True, text=True)
            path.write_text(text)
            caught = result.returncode == 1  # tests failed; 0 passed, anything else did not run
            missed += not caught
            failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")][:1]
            print(f"[{i}] {promise}: {'CAUGHT' if caught else f'NOT CAUGHT (pytest exit {result.returncode})'} "
                  f"in {time.time() - start:.0f} s {' '.join(failed)}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
