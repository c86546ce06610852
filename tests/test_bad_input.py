"""The bad-input table: every command, fed a path it must not write, says so in one line and changes nothing.

Each case is the exact argv, the exit code (2, or 0 where the right behaviour is to succeed), the one-line
message, and the paths the command may create or rewrite; everything else in the temporary tree is hashed
before and after and must be unchanged (nothing deleted, rewritten or added). The integrity property below
runs every writing command against every directory of the tree: no command deletes or rewrites a file it did
not create. All in process through ``pmod_bench.cli.main``; the training runs are marked slow.

Read-only directories: as root ``chmod`` binds nothing, so the fixture then makes ``os.access`` / ``os.mkdir`` /
``os.open`` / ``open`` answer EACCES for entries made in the directory, as the kernel does for a user.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from test_convert import PATCH, TILE, write_original

LONG = "x" * 300  # a file name longer than any filesystem's NAME_MAX (255)


# --------------------------------------------------------------------------------------------- the tree
def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run_dir(path: Path, kind: str, data_file: str, data: dict, extra: Optional[dict] = None) -> None:
    _json(path / "run.json", {"kind": kind, "schema_version": 1, "created": "2026-01-01T00:00:00Z", "command": f"pmod-bench {kind}"})
    _json(path / data_file, data)
    for rel, obj in (extra or {}).items():
        _json(path / rel, obj)


def _bad_arch(path: Path, **text) -> None:
    from pmod_bench.model.presets import preset_config

    d = preset_config("tiny").to_dict()
    d["text_config"].update(text)
    _json(path / "config.json", d)


def build_world(root: Path, clip: Path) -> None:
    """SRC (an original-layout checkpoint) with a sibling file, an earlier conversion (with and without the user's
    file beside it, and one from before manifests), user files, a file, run directories of every kind, a directory
    with only data/, LLaVA configs that do not add up, training data."""
    from pmod_bench.cli import main
    from pmod_bench.train.demo import make_demo_dataset

    write_original(root / "src", clip, next_shape=False, pmod=False, save_vision=True, layers=2, shards=1)
    (root / "notes.txt").write_text("a sibling of SRC")
    assert main(["convert", str(root / "src"), str(root / "conv")]) == 0
    shutil.copytree(root / "conv", root / "conv_extra")
    (root / "conv_extra" / "mine.txt").write_text("the user's file in a converted directory")
    shutil.copytree(root / "conv", root / "old_conv")
    (root / "old_conv" / ".pmod_convert_manifest.json").unlink()  # as converted before manifests existed
    (root / "user" / "sub").mkdir(parents=True)
    (root / "user" / "config.json").write_text('{"mine": true}')
    (root / "user" / "sub" / "b.txt").write_text("b")
    (root / "afile.txt").write_text("a file")
    (root / "empty").mkdir()
    _run_dir(root / "eval_run", "eval", "summary.json", {"model": "tiny", "pmod": None, "rows": [], "complete": False},
             {"responses/responses.rank0.jsonl": {"answer": "yes"}})
    summary = {"recipe": "demo-tiny", "stage": "sft", "status": "completed", "steps": 4, "max_steps": 4, "gpu_hours": 0.01,
               "pmod": None}
    _run_dir(root / "train_run", "train", "train_summary.json", summary)
    _run_dir(root / "failed_train", "train", "train_summary.json",
             {**summary, "status": "failed", "steps": 2, "error": "OSError: [Errno 28] No space left on device"})
    _run_dir(root / "profile_run", "profile", "profile.json", {"rows": []})
    (root / "data_only" / "data").mkdir(parents=True)
    (root / "data_only" / "data" / "x.txt").write_text("someone's data")
    _json(root / "repro" / "run.json", {"kind": "reproduce", "schema_version": 1})
    _bad_arch(root / "arch_heads", hidden_size=30)
    _bad_arch(root / "arch_layers", num_hidden_layers=0)
    make_demo_dataset(root / "data", n_image=2, n_text=1)


@pytest.fixture(scope="module")
def base_world(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(clip)
    root = tmp_path_factory.mktemp("world") / "w"
    root.mkdir()
    build_world(root, clip)
    return root


@pytest.fixture
def world(base_world, tmp_path):
    """A fresh copy of the tree for one command."""
    w = tmp_path / "w"
    shutil.copytree(base_world, w, symlinks=True)
    return w


def snapshot(root: Path, skip: tuple = ()) -> dict:
    """{relative path: content hash | "dir" | "link:TARGET"} of everything under ``root`` (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = p.relative_to(root)
            if any(rel == Path(s) or Path(s) in rel.parents for s in skip):
                continue
            if p.is_symlink():
                out[str(rel)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(rel)] = "dir"
            else:
                out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------------------------- read-only dirs
@pytest.fixture
def read_only(monkeypatch):
    """``make(path, access_lies=False)``: ``path`` becomes a read-only directory. Not root: chmod 0555. Root (chmod
    binds nothing): as chmod would, EACCES from os.access on ``path`` and from os.mkdir / os.open / open creating
    an entry in it (its subdirectories keep their own modes); ``access_lies`` leaves os.access saying yes, so only
    the writes fail (what NFS or ACLs can do)."""
    chmodded = []

    def make(path: Path, access_lies: bool = False) -> None:
        path.mkdir(exist_ok=True)
        if os.geteuid() != 0 and not access_lies:
            path.chmod(0o555)
            chmodded.append(path)
            return
        root = os.path.realpath(path)
        here = lambda p: os.path.realpath(os.path.abspath(os.fspath(p))) == root  # noqa: E731
        in_it = lambda p: here(os.path.dirname(os.path.abspath(os.fspath(p))))  # noqa: E731  (an entry of root)

        def deny(p):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(p))

        real_access, real_mkdir, real_os_open, real_open = os.access, os.mkdir, os.open, builtins.open
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def fake_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and in_it(file):
                deny(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_mkdir(p, *args, **kwargs):
            if os.path.lexists(p):  # the kernel says EEXIST first
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(p))
            if in_it(p):
                deny(p)
            return real_mkdir(p, *args, **kwargs)

        if not access_lies:
            monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if (mode & os.W_OK and here(p)) else real_access(p, mode, *a, **k))
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: deny(p) if (flags & writes and in_it(p)) else real_os_open(p, flags, *a, **k))
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    yield make
    for p in chmodded:
        p.chmod(0o755)


# ------------------------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    argv: list  # "{w}" is the tree's root
    rc: int
    message: str  # a substring of the one line (stderr for refusals)
    may_write: tuple = ()  # paths (relative to the tree) the command may create or rewrite
    read_only: Optional[str] = None  # a directory of the tree made read-only first
    access_lies: bool = False
    check: Optional[Callable[[Path, str], None]] = None  # more assertions: (tree, stderr + stdout)
    extra: dict = field(default_factory=dict)


def _converted_by_overwrite(w: Path, out: str) -> None:
    from pmod_bench.model.convert_dst import MANIFEST

    files = json.loads((w / "conv" / MANIFEST).read_text())["files"]
    assert sorted(files) == sorted(str(p.relative_to(w / "conv")) for p in (w / "conv").rglob("*")
                                   if p.is_file() and p.name != MANIFEST)
    assert "pmod_bench_conversion.json" in files and not [p for p in w.iterdir() if p.name.startswith(".pmod-convert")]


def _failed_train_warned(w: Path, out: str) -> None:
    line = next(ln for ln in out.splitlines() if "failed_train" in ln and "warning" in ln)
    assert "failed train run at step 2 of 4 (OSError: [Errno 28] No space left on device)" in line
    index = (w / "report" / "index.md").read_text()
    assert "## Warnings" in index and "failed train run at step 2 of 4" in index


def _user_files_kept(w: Path, out: str) -> None:
    assert (w / "user" / "config.json").read_text() == '{"mine": true}' and (w / "user" / "sub" / "b.txt").read_text() == "b"
    assert (w / "user" / "report.json").is_file()


TRAIN = ["train", "--config", "demo-tiny", "data.json={w}/data/data.json", "data.image_folder={w}/data"]
PROFILE = ["profile", "--arch", "tiny", "--no-latency", "--no-verify", "-q"]
CASES = [
    # convert: SRC and DST never contain one another; --overwrite replaces only an earlier conversion
    Case("convert-dst-is-src-parent", ["convert", "{w}/src", "{w}", "--overwrite"], 2, "contains SRC"),
    Case("convert-dst-is-src", ["convert", "{w}/src", "{w}/src", "--overwrite"], 2, "is SRC"),
    Case("convert-dst-is-src-no-overwrite", ["convert", "{w}/src", "{w}/src"], 2, "is SRC"),
    Case("convert-dst-inside-src", ["convert", "{w}/src", "{w}/src/hf", "--overwrite"], 2, "is inside SRC"),
    Case("convert-dst-via-symlink-into-src", ["convert", "{w}/src", "{w}/link/hf", "--overwrite"], 2, "is inside SRC",
         extra={"link": "src"}),
    Case("convert-dst-is-symlink", ["convert", "{w}/src", "{w}/link", "--overwrite"], 2, "is a symbolic link",
         extra={"link": "."}),
    Case("convert-user-dir-overwrite", ["convert", "{w}/src", "{w}/user", "--overwrite"], 2,
         "was not written by `pmod-bench convert`"),
    Case("convert-user-dir", ["convert", "{w}/src", "{w}/user"], 2, "exists and is not empty; pass a new or empty DST"),
    Case("convert-extra-file-overwrite", ["convert", "{w}/src", "{w}/conv_extra", "--overwrite"], 2,
         "holds mine.txt, which `pmod-bench convert` did not write"),
    Case("convert-pre-manifest-overwrite", ["convert", "{w}/src", "{w}/old_conv", "--overwrite"], 2, "no .pmod_convert_manifest.json"),
    Case("convert-earlier-no-overwrite", ["convert", "{w}/src", "{w}/conv"], 2, "pass --overwrite to replace that earlier conversion"),
    Case("convert-earlier-overwrite", ["convert", "{w}/src", "{w}/conv", "--overwrite"], 0, "converted", may_write=("conv",),
         check=_converted_by_overwrite),
    Case("convert-empty-dir", ["convert", "{w}/src", "{w}/empty"], 0, "converted", may_write=("empty",)),
    Case("convert-dst-is-file", ["convert", "{w}/src", "{w}/afile.txt"], 2, "afile.txt is a file"),
    Case("convert-dst-name-too-long", ["convert", "{w}/src", "{w}/" + LONG], 2, "longer than the file system allows"),
    Case("convert-dst-read-only", ["convert", "{w}/src", "{w}/ro/hf"], 2, "is not writable by this user", read_only="ro"),
    Case("convert-empty-dst-in-read-only-dir", ["convert", "{w}/src", "{w}/ro/empty"], 2, "/ro is not writable by this user",
         read_only="ro", extra={"mkdir": ["ro/empty"]}),  # DST itself writable; the sibling and the rename need its parent
    Case("convert-dst-read-only-at-write", ["convert", "{w}/src", "{w}/ro/hf"], 2, "Permission denied", read_only="ro",
         access_lies=True),
    # profile: never into another run's directory; the architecture checked before anything divides by it
    Case("profile-into-eval-run", PROFILE + ["--output", "{w}/eval_run"], 2, "holds a 'eval' run; pass a new --output"),
    Case("profile-into-train-run", PROFILE + ["--output", "{w}/train_run"], 2, "holds a 'train' run"),
    Case("profile-into-user-dir", PROFILE + ["--output", "{w}/user"], 2, "is not empty and holds no run.json"),
    Case("profile-output-is-file", PROFILE + ["--output", "{w}/afile.txt"], 2, "afile.txt is a file"),
    Case("profile-output-name-too-long", PROFILE + ["--output", "{w}/" + LONG], 2, "longer than the file system allows"),
    Case("profile-output-read-only", PROFILE + ["--output", "{w}/ro/p"], 2, "is not writable by this user", read_only="ro"),
    Case("profile-json-into-eval-run", PROFILE + ["--json", "{w}/eval_run/rows.json"], 2, "is a 'eval' run directory"),
    Case("profile-arch-heads", ["profile", "--arch", "{w}/arch_heads", "-q"], 2,
         "text_config.hidden_size (30) is not a multiple of text_config.num_attention_heads (4)"),
    Case("profile-arch-zero-layers", ["profile", "--arch", "{w}/arch_layers", "-q"], 2, "text_config.num_hidden_layers is 0"),
    Case("profile-output-in-use", PROFILE + ["--output", "{w}/profile_run"], 2,
         "profile_run is in use by pid {pid} (pmod-bench holder, started ", extra={"lock": "profile_run"}),
    Case("profile-new-output-in-use", PROFILE + ["--output", "{w}/new"], 2, "new is in use by pid {pid} (pmod-bench holder",
         extra={"lock": "new"}),
    Case("profile-arch-preset-shadowed", PROFILE, 2, "'tiny' names both the preset 'tiny' (random weights) and the "
         "directory {w}/tiny in the working directory; pass ./tiny for the directory", extra={"cwd": ".", "mkdir": ["tiny"]}),
    # report: never into a run directory, never over a file it did not write; a failed train run is warned about
    Case("report-into-eval-run", ["report", "{w}/eval_run", "--no-figures", "--output", "{w}/profile_run"], 2,
         "is a 'profile' run directory"),
    Case("report-into-its-own-input", ["report", "{w}/eval_run", "--no-figures", "--output", "{w}/eval_run"], 2,
         "is a 'eval' run directory"),
    Case("report-output-is-file", ["report", "--paper", "--no-figures", "--output", "{w}/afile.txt"], 2, "afile.txt is a file"),
    Case("report-beside-foreign-files", ["report", "--paper", "--no-figures", "--output", "{w}/user"], 0, "wrote 12 tables",
         may_write=("user",), check=_user_files_kept),
    Case("report-over-a-foreign-file", ["report", "--paper", "--no-figures", "--output", "{w}/user"], 2,
         "holds index.md, which no earlier report wrote", extra={"write": {"user/index.md": "my notes"}}),
    Case("report-output-read-only", ["report", "--paper", "--no-figures", "--output", "{w}/ro/r"], 2, "not writable by this user",
         read_only="ro"),
    Case("report-output-read-only-at-write", ["report", "--paper", "--no-figures", "--output", "{w}/ro/r"], 2,
         "Permission denied", read_only="ro", access_lies=True),
    Case("report-output-name-too-long", ["report", "--paper", "--no-figures", "--output", "{w}/" + LONG], 2,
         "longer than the file system allows"),
    Case("report-failed-train-run", ["report", "{w}/failed_train", "--no-figures", "--output", "{w}/report"], 0,
         "warning: ", may_write=("report",), check=_failed_train_warned),
    # train: only into its own run directory (or a new / empty one)
    Case("train-into-eval-run", TRAIN + ["-o", "{w}/eval_run"], 2, "holds a 'eval' run; pass a new output_dir (-o DIR)"),
    Case("train-into-profile-run", TRAIN + ["-o", "{w}/profile_run"], 2, "holds a 'profile' run"),
    Case("train-demo-into-eval-run", ["train", "--demo", "-o", "{w}/eval_run"], 2, "holds a 'eval' run"),
    Case("train-into-user-dir", TRAIN + ["-o", "{w}/user"], 2, "is not empty and holds no run.json"),
    Case("train-output-is-file", TRAIN + ["-o", "{w}/afile.txt"], 2, "afile.txt is a file"),
    Case("train-output-name-too-long", TRAIN + ["-o", "{w}/" + LONG], 2, "longer than the file system allows"),
    Case("train-output-read-only", TRAIN + ["-o", "{w}/ro/t"], 2, "is not writable by this user", read_only="ro"),
    Case("train-demo-output-read-only", ["train", "--demo", "-o", "{w}/ro/t"], 2, "is not writable by this user", read_only="ro"),
    Case("train-output-in-use", TRAIN + ["-o", "{w}/train_run"], 2, "train_run is in use by pid {pid} (pmod-bench holder, "
         "started ", extra={"lock": "train_run"}),
    Case("train-demo-output-in-use", ["train", "--demo", "-o", "{w}/new"], 2, "new is in use by pid {pid}",
         extra={"lock": "new"}),  # not even the demo's data is written
    # reproduce: adopts only a directory an earlier reproduce made
    Case("reproduce-data-only", ["reproduce", "--toy", "--output", "{w}/data_only"], 2,
         "is not empty and holds no run.json (it is no reproduce run's); pass a new or empty --output (or that of an earlier"),
    Case("reproduce-into-eval-run", ["reproduce", "--toy", "--output", "{w}/eval_run"], 2, "holds a 'eval' run"),
    Case("reproduce-output-is-file", ["reproduce", "--toy", "--output", "{w}/afile.txt"], 2, "afile.txt is a file"),
    Case("reproduce-output-name-too-long", ["reproduce", "--toy", "--output", "{w}/" + LONG], 2, "longer than the file system allows"),
    Case("reproduce-output-read-only", ["reproduce", "--toy", "--output", "{w}/ro/t"], 2, "is not writable by this user",
         read_only="ro"),
    Case("reproduce-output-in-use", ["reproduce", "--toy", "--output", "{w}/repro"], 2, "repro is in use by pid {pid} "
         "(pmod-bench holder, started ", extra={"lock": "repro"}),
]


def _argv(case: Case, w: Path) -> list:
    return [a.replace("{w}", str(w)) for a in case.argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_table(case, world, read_only, capsys, monkeypatch):
    """``extra``: ``link`` (a symbolic link ``link`` to it), ``write`` / ``mkdir`` (made first), ``cwd`` (the working
    directory, in the tree), ``lock`` (a run directory another owner holds meanwhile: its lock is taken in this
    process, which a second lock refuses as another process's; ``{pid}`` in the message is this process)."""
    from pmod_bench.cli import main
    from pmod_bench.rundir import run_lock

    if "link" in case.extra:
        (world / "link").symlink_to(world / case.extra["link"])
    for rel, text in case.extra.get("write", {}).items():
        (world / rel).write_text(text)
    for rel in case.extra.get("mkdir", []):
        (world / rel).mkdir(parents=True)
    if "cwd" in case.extra:
        monkeypatch.chdir(world / case.extra["cwd"])
    if case.read_only:
        read_only(world / case.read_only, access_lies=case.access_lies)
    with run_lock(world / case.extra["lock"], command="pmod-bench holder") if "lock" in case.extra else contextlib.nullcontext():
        before = snapshot(world, skip=case.may_write)
        rc = main(_argv(case, world))
        captured = capsys.readouterr()
        after = snapshot(world, skip=case.may_write)
    assert rc == case.rc, (case.id, captured.err[-2000:])
    if case.rc == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pmod-bench ") and ": error: " in lines[0], (case.id, captured.err)
        assert case.message.format(pid=os.getpid(), w=world) in lines[0], (case.id, lines[0])
        assert "Traceback" not in captured.err
    else:
        assert case.message in captured.err + captured.out, (case.id, captured.err + captured.out)
    assert after == before, f"{case.id}: something outside the run's own files changed"
    if case.check:
        case.check(world, captured.err + captured.out)


# ---------------------------------------------------------------------------------- the integrity property
WRITERS = {
    "convert": (["convert", "{w}/src", "{t}"], ()),
    "convert --overwrite": (["convert", "{w}/src", "{t}", "--overwrite"], ()),
    "profile": (PROFILE + ["--output", "{t}"], ("profile_run",)),
    "report": (["report", "{w}/eval_run", "--no-figures", "--output", "{t}"], ()),
    "train": (TRAIN + ["-o", "{t}"], ("train_run", "failed_train")),
    "reproduce": (["reproduce", "--toy", "--output", "{t}"], ("repro",)),
}
TARGETS = (".", "src", "conv", "conv_extra", "old_conv", "user", "afile.txt", "eval_run", "train_run", "failed_train",
           "profile_run", "data_only", "repro")


def test_no_command_deletes_or_rewrites_a_file_it_did_not_create(base_world, tmp_path, capsys):
    """Every writing command against every directory (and a file) of the tree, its own kind's excepted: each file
    there before is there after, byte for byte. Where the command succeeds it only adds files (a report beside
    others), or replaces what the same command wrote (convert --overwrite of an earlier conversion)."""
    from pmod_bench.cli import main

    outcomes = {}
    for name, (argv, own) in WRITERS.items():
        for target in TARGETS:
            if target in own:
                continue
            w = tmp_path / f"{name.replace(' ', '')}-{target.replace('.', 'root')}" / "w"
            shutil.copytree(base_world, w, symlinks=True)
            before = snapshot(w)
            rc = main([a.replace("{w}", str(w)).replace("{t}", str(w / target)) for a in argv])
            capsys.readouterr()
            after = snapshot(w)
            rewritable = "conv" if (name, target) == ("convert --overwrite", "conv") else None
            changed = [p for p, h in before.items() if after.get(p) != h and not (rewritable and p.startswith(rewritable + "/"))]
            assert not changed, f"{name} -> {target} (rc {rc}) deleted or rewrote {changed[:5]}"
            outcomes[(name, target)] = rc
    succeeded = sorted(k for k, rc in outcomes.items() if rc == 0)
    assert ("convert --overwrite", "conv") in succeeded
    assert all(name in ("report", "convert --overwrite") for name, _ in succeeded), succeeded


# ------------------------------------------------------------------------------------------ unit level
def test_image_paths_outside_the_folder_are_bad_records_never_opened(tmp_path, monkeypatch):
    """``../``, absolute paths and a symbolic link pointing out are refused before anything opens them; the record
    counts as bad with the reason, and a good record of the same modality takes its place."""
    from PIL import Image

    from pmod_bench.model.presets import preset_processor
    from pmod_bench.train import data as data_mod

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(folder / "good.png")
    Image.new("RGB", (32, 24), (30, 30, 200)).save(tmp_path / "secret.png")  # outside: a valid image, were it read
    (folder / "out.png").symlink_to(tmp_path / "secret.png")
    (folder / "in.png").symlink_to(folder / "good.png")  # a link that stays inside is fine
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    escapes = ["../secret.png", "../../../../etc/passwd", str(tmp_path / "secret.png"), "out.png", "sub/../../secret.png"]
    records = [{"id": f"r{i}", "image": p, "conversations": conv} for i, p in enumerate(escapes + ["good.png", "in.png"])]
    opened = []
    real_load = data_mod.load_image
    monkeypatch.setattr(data_mod, "load_image", lambda path: opened.append(path) or real_load(path))
    ds = data_mod.LlavaConversationDataset(records, preset_processor("tiny"), image_folder=str(folder), image_aspect_ratio="native")
    for i in range(len(escapes)):
        sample = ds[i]  # a good record in its place
        assert sample["bad_samples"][0]["index"] == i and "pixel_values" in sample
    found = {e["index"]: e for e in ds.known_bad.values()}
    assert sorted(found) == list(range(len(escapes)))
    for i, rel in enumerate(escapes):
        assert found[i]["path"] == rel and "leads outside data.image_folder" in found[i]["reason"], found[i]
    assert "an absolute path" in found[2]["reason"] and ".. components or a symbolic link" in found[3]["reason"]
    assert ds[6]["bad_samples"] == []  # in.png -> good.png, inside
    real = os.path.realpath(folder)
    assert opened and all(os.path.realpath(p).startswith(real + os.sep) for p in opened), opened
    with pytest.raises(data_mod.BadSampleError, match=r"record 1 .*leads outside data.image_folder \(.. components"):
        data_mod.LlavaConversationDataset(records, preset_processor("tiny"), image_folder=str(folder),
                                          image_aspect_ratio="native", on_bad_sample="fail")[1]


def test_reproduce_adopts_only_its_own_directory(world):
    from pmod_bench.commands.reproduce import _output_dir
    from pmod_bench.errors import UserError

    assert _output_dir(str(world / "repro")) == str(world / "repro")  # run.json of kind reproduce
    assert _output_dir(str(world / "empty")) == str(world / "empty")
    (world / "legacy").mkdir()
    (world / "legacy" / "reproduce.json").write_text("{}")  # written before run.json existed
    assert _output_dir(str(world / "legacy")) == str(world / "legacy")
    with pytest.raises(UserError, match="no run.json"):
        _output_dir(str(world / "data_only"))


def test_profile_json_beside_its_run_directory(world, capsys):
    """--json inside --output is the profile's own file: the second check (before the run directory is written)
    does not take it for someone else's."""
    from pmod_bench.cli import main

    out = world / "prof"
    assert main(PROFILE + ["--output", str(out), "--json", str(out / "rows.json"), "--no-baseline", "--shift", "0.5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["profile.csv", "profile.json", "rows.json", "run.json"]
    assert json.loads((out / "run.json").read_text())["kind"] == "profile"
    capsys.readouterr()


def test_write_errors_become_one_line():
    from pmod_bench.outputs import describe_write_error

    full = OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors")
    assert describe_write_error(full, "--output", "/runs/x") == ("--output /runs/x: cannot write /runs/x/model.safetensors (No "
                                                                 "space left on device); free disk space, or pass another --output on a disk with room.")
    long = OSError(errno.ENAMETOOLONG, "File name too long", "/runs/x/" + LONG)
    assert describe_write_error(long, "--output", "/runs/x").endswith("use a shorter path.")
    assert describe_write_error(PermissionError(errno.EACCES, "Permission denied", "/data/in.json"), "--output", "/runs/x") is None
    assert describe_write_error(OSError(errno.EIO, "I/O error", "/runs/x/a"), "--output", "/runs/x") is None


def test_a_full_disk_is_recognised_behind_libraries_that_hide_the_errno(tmp_path, monkeypatch):
    """safetensors says "(os error 28)" in a SafetensorError; torch.save a bare RuntimeError, recognised by the space
    left; other errors, and interrupts, are not taken for a full disk."""
    from collections import namedtuple

    from pmod_bench import outputs
    from pmod_bench.errors import UserError

    class SafetensorError(Exception):
        pass

    st = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert outputs.disk_full(st, tmp_path) == "No space left on device"
    torch_error = RuntimeError("basic_ios::clear: iostream error")
    assert outputs.disk_full(torch_error, tmp_path) is None  # room left: some other failure
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    assert outputs.disk_full(torch_error, tmp_path) == "4096 bytes left on the device"
    assert outputs.disk_full(ValueError("bad value"), tmp_path) is None and outputs.disk_full(KeyboardInterrupt(), tmp_path) is None
    with pytest.raises(UserError, match=r"^DST /m: cannot write \(disk full: No space left on device; SafetensorError\); free"):
        with outputs.output_errors("DST", "/m", within=tmp_path):
            raise st
    with pytest.raises(ValueError, match="bad value"):
        with outputs.output_errors("DST", "/m", within=tmp_path):
            raise ValueError("bad value")


# --------------------------------------------------------------------------------------- slow: processes
@pytest.mark.slow
def test_train_disk_full_records_failed_and_resumes(world, monkeypatch, capsys):
    """ENOSPC while a checkpoint is saved: one line (exit 2), train_summary.json status failed with the reason, the
    half-written checkpoint removed; the same command afterwards resumes and completes. The data's records whose
    image paths lead out of the folder are counted bad, with their reason."""
    from pmod_bench.cli import main
    from pmod_bench.train import trainer as trainer_mod

    records = json.loads((world / "data" / "data.json").read_text())
    conv = records[0]["conversations"]
    records += [{"id": "escape", "image": "../../../../etc/passwd", "conversations": conv},
                {"id": "absolute", "image": str(world / "afile.txt"), "conversations": conv}]
    (world / "data" / "data.json").write_text(json.dumps(records))
    out = world / "run"
    argv = [a.replace("{w}", str(world)) for a in TRAIN] + ["train.max_steps=4", "train.save_steps=2", "train.progress_bar=false",
                                                            "train.global_batch_size=2", "train.per_device_batch_size=2", "-o", str(out)]
    real_save = trainer_mod.PMoDTrainer._save_checkpoint

    def full_disk(self, *args, **kwargs):
        ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "model.safetensors").write_bytes(b"\0" * 100)  # what a save cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(ckpt / "optimizer.pt"))

    monkeypatch.setattr(trainer_mod.PMoDTrainer, "_save_checkpoint", full_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pmod-bench train: error: output_dir ") and "No space left on device" in err[-1]
    assert "run the same command again: it resumes" in err[-1] and not any("Traceback" in ln for ln in err)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("disk full (No space left on device): OSError")
    assert not (out / "checkpoint-2").exists()
    monkeypatch.setattr(trainer_mod.PMoDTrainer, "_save_checkpoint", real_save)
    assert main(argv) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    bad = {json.loads(ln)["id"]: json.loads(ln)["reason"] for ln in (out / "bad_samples.jsonl").read_text().splitlines()}
    assert set(bad) >= {"escape", "absolute"} and all("leads outside data.image_folder" in bad[k] for k in ("escape", "absolute"))
    capsys.readouterr()


@pytest.mark.slow
def test_convert_killed_midway_leaves_dst_untouched(world):
    """SIGTERM while the weights are written: DST (an earlier conversion) is as it was and the temporary sibling is
    gone; SIGKILL: DST as it was (the sibling may stay: nothing runs after SIGKILL)."""
    import signal
    import subprocess
    import sys
    import time

    before = snapshot(world / "conv")
    code = ("import sys, time, transformers\n"
            "orig = transformers.PreTrainedModel.save_pretrained\n"
            "def slow(self, *a, **k):\n    orig(self, *a, **k); print('saved', flush=True); time.sleep(60)\n"
            "transformers.PreTrainedModel.save_pretrained = slow\n"
            "from pmod_bench.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, "-c", code, "convert", str(world / "src"), str(world / "conv"), "--overwrite"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert any(line.strip() == "saved" for line in p.stdout)  # (other lines: library warnings)
        assert [q for q in world.iterdir() if q.name.startswith(".pmod-convert-")]  # it writes beside DST
        p.send_signal(sig)
        p.wait(timeout=60)
        time.sleep(0.1)
        assert snapshot(world / "conv") == before
        if sig == signal.SIGTERM:
            assert p.returncode == 128 + signal.SIGTERM
            assert not [q for q in world.iterdir() if q.name.startswith(".pmod-convert-")]


HOLDER = ("import sys, time\nfrom pmod_bench.rundir import run_lock\n"
          "with run_lock(sys.argv[1], command='pmod-bench train (the holder)'):\n    print('held', flush=True)\n"
          "    time.sleep(600)\n")


@pytest.mark.slow
def test_a_killed_owner_of_a_train_run_leaves_no_stuck_lock(world, capsys):
    """Another process owns output_dir: train is refused in one line naming it, and writes nothing (--demo's data
    neither). Once that owner is killed (SIGKILL: nothing of it runs), the same command trains: the OS released the
    lock, the file it left is locked again, and it goes when the run ends."""
    import signal
    import subprocess
    import sys

    from pmod_bench.cli import main
    from pmod_bench.rundir import LOCK_NAME

    out = world / "run"
    argv = ["train", "--demo", "train.max_steps=2", "train.save_steps=100", "train.progress_bar=false", "-o", str(out)]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(world)
        assert main(argv) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith(f"pmod-bench train: error: {out} is in use by pid {holder.pid} (pmod-bench train (the "
                               "holder), started ") and line.endswith("; wait for it or choose another output_dir")
        assert snapshot(world) == before  # only the holder's lock file in run/
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # what the killed owner left: no lock any more
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert json.loads((out / "train_summary.json").read_text())["status"] == "completed"
    assert json.loads((out / "run.json").read_text())["kind"] == "train" and not (out / LOCK_NAME).exists()
    capsys.readouterr()
