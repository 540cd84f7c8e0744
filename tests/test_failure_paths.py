"""Failure paths (#12): a failed run never blocks its corrected re-run, a damaged newest checkpoint never stops
`--resume_from_checkpoint latest`, a file system that refuses a write gets one line (exit 2) and leaves no
temporary behind, and killed runs' temporaries are cleaned up at the next start."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import extract_student
import run_glue_early_exit as script
from common.errors import UserError, run_cli
from common.io import TEMP_MARK, remove_stale_temporaries, temp_name
from conftest import model_state

FAST = ["--max_seq_length", "32", "--per_gpu_train_batch_size", "16", "--per_gpu_eval_batch_size", "16",
        "--learning_rate", "1e-3", "--logging_steps", "2", "--seed", "7"]


def glue(model: str, data: str, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", model, "--data_dir", data, "--task_name", "sst-2", "--output_dir", str(out),
            *FAST, *extra]


def one_line_exit_2(capsys, args: list[str], main=script.main) -> str:
    """Run a script's main() the way its command line does (common.errors.run_cli, in this process: starting a
    Python per case would cost ~10 s each); assert it failed with one line and exit code 2, no traceback;
    return the line."""
    code = run_cli(main, args)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if TEMP_MARK in p.name or p.name.endswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A 1.5 MB tmpfs (root only; skipped where mounting is not allowed), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def mount_tmpfs(options: str) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        return mount

    yield mount_tmpfs
    subprocess.run(["umount", str(mount)], capture_output=True)


# ---------------------------------------------------------------------------------------------- 1. re-run


def test_a_failed_run_does_not_block_its_corrected_rerun(tiny_bert_dir, sst2_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sst2_dir, data)
    good = (data / "train.tsv").read_text()
    lines = good.splitlines()
    lines[5] = "a row without its label"
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"train\.tsv:6"):
        script.main(glue(tiny_bert_dir, str(data), out, "--do_train", "--max_steps", "2", "--save_steps", "0"))
    assert not out.exists()  # it held nothing before: nothing is left
    (data / "train.tsv").write_text(good)
    results = script.main(glue(tiny_bert_dir, str(data), out, "--do_train", "--max_steps", "2", "--save_steps", "0"))
    assert results["train"]["stage2"]["global_step"] == 2


def test_a_failed_run_keeps_what_was_there_and_what_it_made(tiny_bert_dir, sst2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = tmp_path / "data"
    shutil.copytree(sst2_dir, data)
    (data / "dev.tsv").write_text("sentence\tlabel\nno label here\n")
    # Training succeeds and writes the model; evaluation then fails on the bad dev file: the model stays.
    with pytest.raises(UserError, match=r"dev\.tsv:2"):
        script.main(glue(tiny_bert_dir, str(data), out, "--do_train", "--do_eval", "--max_steps", "2",
                         "--save_steps", "0", "--overwrite_output_dir"))
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").is_file() and (out / "run_args.json").is_file()


# ---------------------------------------------------------------------------------------------- 3. latest


@pytest.fixture(scope="module")
def checkpointed(tiny_bert_dir, sst2_dir, tmp_path_factory) -> Path:
    """Two stages of 10 steps, checkpoints at 5 and 10 of each."""
    out = tmp_path_factory.mktemp("checkpointed")
    script.main(glue(tiny_bert_dir, sst2_dir, out, "--do_train", "--num_train_epochs", "1", "--save_steps", "5",
                     "--overwrite_output_dir"))
    return out


@pytest.mark.parametrize("damage", ["truncated_state", "truncated_weights", "pickled_optimizer"])
def test_latest_passes_over_a_damaged_newest_checkpoint(checkpointed, tiny_bert_dir, sst2_dir, tmp_path, damage,
                                                        caplog):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("checkpoint-stage2-000005", "checkpoint-stage2-000010"):
        shutil.copytree(checkpointed / name, out / name)
    newest = out / "checkpoint-stage2-000010"
    if damage == "truncated_state":
        text = (newest / "trainer_state.json").read_text()
        (newest / "trainer_state.json").write_text(text[: len(text) // 2])
    elif damage == "truncated_weights":
        blob = (newest / "model.safetensors").read_bytes()
        (newest / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    else:
        with open(newest / "optimizer.pt", "wb") as f:
            pickle.dump({"looks": "like a checkpoint"}, f)
    with caplog.at_level("WARNING"):
        script.main(glue(tiny_bert_dir, sst2_dir, out, "--do_train", "--num_train_epochs", "1", "--save_steps", "5",
                         "--resume_from_checkpoint", "latest"))
    assert "checkpoint-stage2-000010" in caplog.text and "checkpoint-stage2-000005" in caplog.text
    reference, resumed = model_state(str(checkpointed)), model_state(str(out))
    assert not [k for k in reference if not torch.equal(reference[k], resumed[k])]


def test_a_damaged_checkpoint_named_explicitly_is_one_line(checkpointed, tiny_bert_dir, sst2_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpointed / "checkpoint-stage1-000005", ckpt)
    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"step": 5}, f)
    line = one_line_exit_2(capsys, glue(tiny_bert_dir, sst2_dir, tmp_path / "out", "--do_train",
                                        "--resume_from_checkpoint", str(ckpt)))
    assert "optimizer.pt is damaged" in line


def test_latest_with_only_damaged_checkpoints_is_one_line(checkpointed, tiny_bert_dir, sst2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(checkpointed / "checkpoint-stage1-000005", out / "checkpoint-stage1-000005")
    (out / "checkpoint-stage1-000005" / "trainer_state.json").write_text('{"global_st')
    line = one_line_exit_2(capsys, glue(tiny_bert_dir, sst2_dir, out, "--do_train", "--resume_from_checkpoint",
                                        "latest"))
    assert "no checkpoint" in line and "complete" in line


# ---------------------------------------------------------------------------------------------- 4. one line


def test_a_truncated_model_file_is_one_line(tiny_bert_dir, sst2_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    blob = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    line = one_line_exit_2(capsys, glue(str(model), sst2_dir, tmp_path / "out", "--do_train"))
    assert "model.safetensors is damaged" in line
    assert not (tmp_path / "out").exists()


def test_a_read_only_output_folder_is_one_line(small_disk, tiny_bert_dir, sst2_dir, capsys):
    disk = small_disk("ro,size=1m")
    line = one_line_exit_2(capsys, glue(tiny_bert_dir, sst2_dir, disk / "out", "--do_train", "--max_steps", "2"))
    assert "cannot write" in line and "Read-only file system" in line


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary(small_disk, tiny_bert_dir, sst2_dir, capsys):
    disk = small_disk("size=600k")  # room for the run's bookkeeping, not for a checkpoint of the ~0.5 MB model
    out = disk / "out"
    line = one_line_exit_2(capsys, glue(tiny_bert_dir, sst2_dir, out, "--do_train", "--max_steps", "4",
                                        "--save_steps", "2"))
    assert "cannot write" in line and "free" in line
    assert leftovers(disk) == []


def test_extract_student_refuses_a_file_as_its_folder(tmp_path, capsys):
    target = tmp_path / "student.bin"
    target.write_text("something")
    line = one_line_exit_2(capsys, ["--model_name", str(tmp_path), "--dump_checkpoint", str(target)],
                           extract_student.main)
    assert "is a file" in line
    assert target.read_text() == "something"
    with pytest.raises(UserError):
        extract_student.main(["--model_name", str(tmp_path), "--dump_checkpoint", str(target)])


# ---------------------------------------------------------------------------------------------- 5. leftovers


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.safetensors{TEMP_MARK}{dead_pid}-{uuid.uuid4().hex[:8]}"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f".saving{TEMP_MARK}{dead_pid}-{uuid.uuid4().hex[:8]}"
    stale_dir.mkdir()
    live = Path(temp_name(str(tmp_path / "checkpoint-000004")))  # this process: alive
    live.mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"kept")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted([stale.name, stale_dir.name])
    assert live.exists() and (tmp_path / "model.safetensors").exists()


def test_a_run_cleans_its_output_folder_of_killed_runs_temporaries(tiny_bert_dir, sst2_dir, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".saving{TEMP_MARK}{int(dead.stdout)}-0123abcd").mkdir()
    with caplog.at_level("WARNING"):
        script.main(glue(tiny_bert_dir, sst2_dir, out, "--do_train", "--max_steps", "1", "--save_steps", "0",
                         "--overwrite_output_dir"))
    assert "stopped while saving" in caplog.text
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------- 6. small


def test_feature_caches_follow_the_umask(tiny_bert_dir, sst2_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sst2_dir, data)
    for cached in data.glob("cached_*"):
        cached.unlink()
    old = os.umask(0o022)
    try:
        script.main(glue(tiny_bert_dir, str(data), tmp_path / "out", "--do_train", "--max_steps", "1",
                         "--save_steps", "0"))
    finally:
        os.umask(old)
    caches = list(data.glob("cached_*"))
    assert caches and all(c.stat().st_mode & 0o777 == 0o644 for c in caches)
    assert json.loads((tmp_path / "out" / "run_args.json").read_text())["args"]["max_steps"] == 1


def test_overwriting_a_folder_starts_a_clean_log_and_tensorboard_run(tiny_bert_dir, sst2_dir, tmp_path):
    out = tmp_path / "out"
    args = glue(tiny_bert_dir, sst2_dir, out, "--do_train", "--max_steps", "2", "--save_steps", "0",
                "--logging_steps", "1", "--overwrite_output_dir")
    script.main(args)
    first = (out / "log_history.jsonl").read_text().splitlines()
    script.main(args)
    assert len((out / "log_history.jsonl").read_text().splitlines()) == len(first)  # not appended
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1  # one run's curves, not two zig-zagged
