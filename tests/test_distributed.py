"""One merge across processes (tsvmerge.distributed), launched for real with torchrun: gloo over
loopback, on the CPU. 2 and 3 ranks write tensors byte-identical to one process's (one thread
each), on backends reference and torch and with several alphas, and the report gives every
rank's part; an error found before compute stops every rank with one line and writes nothing;
a rank killed mid-merge, rank 0 or not, leaves nothing behind; a second launch on an output
being written is refused; without torchrun's environment a merge is one process, as before.

Every launch is a subprocess with a timeout (a hang fails, it does not block); independent
launches run side by side, since each start costs seconds."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from tsvmerge.io import load_file, open_checkpoint, save_file
from tsvmerge.zoo import Arch, make_zoo

TINY = Arch("tiny", width=64, layers=1, patch=8, image=32, output_dim=32)    # 20 tensors, 3 tasks
PAUSED_CLI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paused_cli.py")
SEED = "11"
TIMEOUT = 180
BAD_TENSOR = "visual.proj"
ABORT = "terminate called without an active exception"
# launches in the fixture `runs`: (ranks, variant); ranks 1 is one process without torchrun
VARIANTS = {"reference": ["--backend", "reference"], "torch": ["--backend", "torch"], "alphas": ["--alpha", "0.5,1.0"]}
DISTRIBUTED = [(2, "reference"), (3, "reference"), (2, "torch"), (3, "torch"), (2, "alphas")]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(str(tmp_path_factory.mktemp("zoo")), arch=TINY, tasks=3, seed=5, progress=False)


def environment(threads: bool) -> dict:
    """The test's environment without torchrun's variables; one thread (a single process), or
    the thread count left to torchrun (which sets one per rank), as a user launches it."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS") and not k.startswith("TORCHELASTIC_")}
    if threads:
        env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def launch():
    """start(ranks, *argv): `python -m tsvmerge ARGV` (ranks 1, no torchrun) or under torchrun
    with `ranks` processes (script=: another script than tsvmerge). Whatever still runs at the
    end of the module is stopped."""
    procs = []

    def start(ranks, *argv, script=("-m", "tsvmerge")):
        if ranks == 1:
            cmd = [sys.executable, *script, *argv]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   *script, *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=environment(threads=ranks == 1))
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()            # torchrun stops its ranks (SIGTERM, then SIGKILL)
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def finish(proc, timeout=TIMEOUT):
    """(exit code, stdout, stderr) of a launch; a launch still running after `timeout` fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} still ran after {timeout} s: stopped it\n{err[-3000:]}")
    return proc.returncode, out, err


def merge_args(zoo, out, *flags, tasks=None):
    return ["merge", zoo.base, *(tasks or zoo.finetuned), "-o", str(out), "--seed", SEED, "--no-progress", *flags]


def tsvmerge_lines(err: str) -> list[str]:
    """The lines tsvmerge printed (not torchrun's own)."""
    return [line for line in err.splitlines() if line.startswith("tsvmerge merge")]


def rank_exits(err: str) -> dict[int, int]:
    """Exit code of each rank that failed, from torchrun's summary of failures."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)", err)
    return {int(rank): int(code) for rank, code in found}


def assert_no_abort(err: str):
    """No rank died in its teardown with "terminate called without an active exception"
    (SIGABRT): the gloo process group must be destroyed before a rank exits."""
    assert ABORT not in err, ("a rank aborted at exit (SIGABRT), after its work was done: library bug, the gloo "
                              "process group is not destroyed before the process exits\n" + err[-4000:])


def assert_every_rank_exits(err: str, ranks: int, code: int):
    """Every rank's exit code, from torchrun's summary, is `code`: a rank that stops because
    another failed exits with that one's code."""
    exits = rank_exits(err)
    assert exits == dict.fromkeys(range(ranks), code), (
        f"every rank must exit {code}, got {exits} (-15: torchrun's SIGTERM, sent once the first rank had exited, "
        f"killed a rank that had already decided its exit code)\n" + err[-4000:])


def tensors(folder) -> dict:
    """name -> (dtype, shape, bytes) of every tensor of a model folder."""
    ckpt = open_checkpoint(str(folder))
    out = {}
    for name, info in ckpt.infos().items():
        t = ckpt.read(name).contiguous()
        out[name] = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8))
        assert (t.dtype, tuple(t.shape)) == (info.dtype, tuple(info.shape)), name
    return out


def assert_same_tensors(got_folder, want_folder):
    got, want = tensors(got_folder), tensors(want_folder)
    assert sorted(got) == sorted(want)
    for name, (dtype, shape, data) in want.items():
        assert got[name][:2] == (dtype, shape), name
        assert torch.equal(got[name][2], data), f"{name}: bytes differ from the single-process merge"


def report(folder) -> dict:
    with open(os.path.join(folder, "tsvmerge_report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(zoo, launch, tmp_path_factory):
    """Every merge that needs no signal, launched side by side: {(ranks, variant): (out,
    exit code, stdout, stderr)} for the single processes (ranks 1, one thread) and
    DISTRIBUTED, and the refused launches ("bad-shape", "exists")."""
    root = tmp_path_factory.mktemp("runs")
    started = {}
    for ranks, variant in [(1, v) for v in VARIANTS] + DISTRIBUTED:
        out = root / f"{ranks}-{variant}" / "out"
        out.parent.mkdir()
        started[ranks, variant] = out, launch(ranks, *merge_args(zoo, out, *VARIANTS[variant]))
    bad = root / "inputs" / "bad_task.safetensors"      # one tensor's shape is not the base's
    bad.parent.mkdir()
    sd = load_file(zoo.finetuned[1])
    sd[BAD_TENSOR] = sd[BAD_TENSOR][:-1].clone()
    save_file(sd, str(bad))
    out = root / "bad-shape" / "out"
    out.parent.mkdir()
    started["bad-shape"] = out, launch(2, *merge_args(zoo, out, tasks=[zoo.finetuned[0], str(bad), zoo.finetuned[2]]))
    out = root / "exists" / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("an earlier output")
    started["exists"] = out, launch(2, *merge_args(zoo, out))
    for ranks in (1, 2):
        out = root / f"{ranks}-compress" / "task.tsvc.safetensors"
        out.parent.mkdir()
        started[ranks, "compress"] = out, launch(ranks, "compress", zoo.base, zoo.finetuned[0], "-o", str(out),
                                                 "--rank", "0.25", "--no-progress")
        out = root / f"{ranks}-interference" / "sti.json"
        out.parent.mkdir()
        started[ranks, "interference"] = out, launch(ranks, "interference", zoo.base, *zoo.finetuned, "--report",
                                                     str(out), "--no-progress")
    return {key: (out, *finish(proc)) for key, (out, proc) in started.items()}


@pytest.mark.parametrize("ranks, variant", DISTRIBUTED, ids=[f"{r}-{v}" for r, v in DISTRIBUTED])
def test_ranks_write_what_one_process_writes(runs, ranks, variant):
    """N ranks write the same tensors, byte for byte, as one process with one thread (each rank
    has one thread under torchrun); the report names every rank, their cost shares sum to 1,
    each did part of the work, and together the tensors of the single run."""
    out, code, _, err = runs[ranks, variant]
    single, single_code, _, single_err = runs[1, variant]
    assert single_code == 0, single_err
    assert_no_abort(err)
    assert code == 0, err
    assert os.listdir(out.parent) == ["out"]                # no staging left
    folders = [""]
    if variant == "alphas":
        folders = sorted(os.listdir(single))
        assert folders == ["alpha-0.5", "alpha-1.0"]
        assert sorted(os.listdir(out)) == folders
    for sub in folders:
        assert_same_tensors(out / sub, single / sub)
        rep, one = report(out / sub), report(single / sub)
        parts = rep["ranks"]
        assert [p["rank"] for p in parts] == list(range(ranks)), parts
        assert len({p["pid"] for p in parts}) == ranks and all(p["host"] for p in parts), parts
        assert abs(sum(p["share"] for p in parts) - 1) < 1e-3, parts
        assert all(p["tensors"] > 0 and p["wall_s"] >= 0 and p["peak_rss_bytes"] > 0 for p in parts), parts
        assert rep["summary"]["tensors"] == one["summary"]["tensors"] == len(tensors(single / sub)) == 20
        assert sum(p["tensors"] for p in parts) == rep["summary"]["tensors"], parts


def test_compress_and_interference_across_ranks(runs):
    """`compress` and `interference` under torchrun: the TSV-C file is byte for byte one
    process's (rank 0 makes the file, every rank writes its tensors into it), the interference
    report holds the same numbers; rank 0 alone prints, and nothing is left beside the outputs."""
    for what, says in (("compress", "compressed"), ("interference", "STI")):
        (one, code1, _, err1), (two, code2, stdout2, err2) = runs[1, what], runs[2, what]
        assert code1 == 0 and code2 == 0, err1 + err2
        assert_no_abort(err2)
        assert os.listdir(two.parent) == [two.name]
        assert stdout2.count(says) == 1, stdout2
    assert runs[1, "compress"][0].read_bytes() == runs[2, "compress"][0].read_bytes()
    one, two = (json.loads(runs[r, "interference"][0].read_text()) for r in (1, 2))
    assert one["tensors"] == two["tensors"] and len(one["tensors"]) > 0


def test_without_torchrun_one_process(runs):
    """`python -m tsvmerge merge` without torchrun's environment is the single-process merge:
    exit 0, no rank in any line, no `ranks` in the report."""
    for variant in VARIANTS:
        out, code, stdout, err = runs[1, variant]
        assert code == 0, err
        assert "[rank" not in stdout + err and stdout.startswith("merged 20 tensors"), stdout + err
        for sub in (["alpha-0.5", "alpha-1.0"] if variant == "alphas" else [""]):
            rep = report(out / sub)
            assert "ranks" not in rep and rep["summary"]["tensors"] == 20


def test_bad_input_stops_every_rank_before_compute(runs):
    """A task whose tensor has another shape than the base's, found from the headers: every
    rank exits 2, one line names the file and the tensor, and nothing is written, not even
    the staging folder."""
    out, code, _, err = runs["bad-shape"]
    assert code != 0, err
    lines = tsvmerge_lines(err)
    assert len(lines) == 1 and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert re.match(r"tsvmerge merge \[rank [01]\]: error: ", lines[0]), lines
    assert "bad_task.safetensors" in lines[0] and repr(BAD_TENSOR) in lines[0], lines
    assert os.listdir(out.parent) == []
    assert_no_abort(err)
    assert_every_rank_exits(err, 2, 2)


def test_existing_output_stops_every_rank(runs):
    """An output that exists, without --overwrite, found by rank 0 alone: every rank exits 2,
    one line (rank 0's) says why, and the output is untouched."""
    out, code, _, err = runs["exists"]
    lines = tsvmerge_lines(err)
    assert code != 0, err
    assert os.listdir(out.parent) == ["out"] and os.listdir(out) == ["old.txt"]
    assert (out / "old.txt").read_text() == "an earlier output"
    assert lines == [f"tsvmerge merge [rank 0]: error: {out}: already exists: pass --overwrite to replace it, "
                     "or choose another path"], "one line, rank 0's, and rank 1 silent\n" + err
    assert_no_abort(err)
    assert_every_rank_exits(err, 2, 2)


def wait_for(paths, proc, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert proc.poll() is None, finish(proc)
        assert time.monotonic() < deadline, f"{paths} never all appeared"
        time.sleep(0.02)


def start_paused(launch, zoo, folder, go="-", *flags):
    """A 2-rank merge into folder/work/out whose ranks each pause after their first tensor
    (tests/paused_cli.py): (process, out, {rank: its paused file})."""
    out = folder / "work" / "out"
    out.parent.mkdir(parents=True)
    paused = str(folder / "paused")
    proc = launch(2, paused, str(go), *merge_args(zoo, out, *flags), script=(PAUSED_CLI,))
    return proc, out, {r: f"{paused}.rank{r}" for r in range(2)}


def pid(paused_file) -> int:
    with open(paused_file) as f:
        return int(f.read())


def test_killed_rank_publishes_nothing(zoo, launch, tmp_path):
    """SIGKILL to one rank mid-merge (rank 1, or rank 0, which made the staging folder):
    torchrun stops the other, which removes the staging folder; the job fails and the output
    never appears."""
    runs = {victim: start_paused(launch, zoo, tmp_path / f"kill-rank{victim}") for victim in (0, 1)}
    for victim, (proc, out, paused) in runs.items():
        wait_for(paused.values(), proc)
        staging = os.listdir(out.parent)
        assert len(staging) == 1 and staging[0].startswith(f".out.tmp-{pid(paused[0])}-"), staging
        assert os.listdir(out.parent / staging[0]), "paused after a tensor was written, yet no shard file"
        os.kill(pid(paused[victim]), signal.SIGKILL)
    for victim, (proc, out, paused) in runs.items():
        code, _, err = finish(proc)
        assert code != 0, err
        exits = rank_exits(err)
        assert exits.get(victim) == -signal.SIGKILL and exits.get(1 - victim, 0) != 0, err
        assert all("nothing was" in line for line in tsvmerge_lines(err)), err
        deadline = time.monotonic() + 5
        while os.listdir(out.parent) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.listdir(out.parent) == [], f"debris after rank {victim} was killed: {os.listdir(out.parent)}"


def test_second_launch_refused_while_first_runs(zoo, launch, runs, tmp_path):
    """While a 2-rank merge writes an output, another launch on it (one process, or 2 ranks
    under torchrun) is refused at its start, exit 2 and one line naming the first run's
    process, and touches nothing; the first then publishes its merge whole."""
    go = tmp_path / "GO"
    proc, out, paused = start_paused(launch, zoo, tmp_path / "first", go, "--backend", "torch")
    wait_for(paused.values(), proc)
    before = sorted(os.listdir(out.parent))
    second = {ranks: launch(ranks, *merge_args(zoo, out, "--backend", "torch")) for ranks in (1, 2)}
    results = {ranks: finish(p) for ranks, p in second.items()}
    why = f"{out}: another run is writing it now (process {pid(paused[0])}): wait for it to finish, or choose " \
          "another path"
    code, _, err = results[1]
    assert code == 2 and tsvmerge_lines(err) == [f"tsvmerge merge: error: {why}"], err
    assert sorted(os.listdir(out.parent)) == before
    open(go, "w").close()
    code, _, err = finish(proc)
    assert_no_abort(err)
    assert code == 0, err
    assert os.listdir(out.parent) == ["out"]
    assert_same_tensors(out, runs[1, "torch"][0])
    assert len(report(out)["ranks"]) == 2
    code, _, err = results[2]
    assert code != 0, err
    assert tsvmerge_lines(err) == [f"tsvmerge merge [rank 0]: error: {why}"], "one line, rank 0's, and rank 1 " \
        "silent\n" + err
    assert_no_abort(err)
    assert_every_rank_exits(err, 2, 2)
