"""train.async_save under SIGKILL: N trials (10 by default) of a 2-process ZeRO-2 tiny run whose
background checkpoint writes are slowed (0.4 s a file) and which is SIGKILLed at a random moment
of a write (a save after the first commit: mid-file, between files, between the ranks' files and
COMPLETE, around `latest`). After each kill: `latest` must name a complete checkpoint and every
complete checkpoint must load; then the run is resumed and must equal a synchronous reference run
bit for bit (per-step losses, final weights, every checkpoint's loaded state). Prints one line per
trial and the tally. The same trial is tests/test_async_save.py's (2 trials there).

    python bench/async_save_kill.py                 # 10 trials (~2 runs each)
    python bench/async_save_kill.py --trials 3
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--out", default="/tmp/mmpretrain_async_save_kill")
    p.add_argument("--seed", type=int, default=0, help="trial i uses seed + i (kill step and moment)")
    args = p.parse_args()
    import asyncsavekit as ak
    import trainkit as tk

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = tk.make_tiny_data(out / "data")
    t0 = time.time()
    ref = ak.reference(data, out / "ref", out / "ref.log")
    print(f"reference (synchronous saves) done in {time.time() - t0:.0f} s", flush=True)
    passed = 0
    for i in range(args.trials):
        run, log = out / f"trial{i}", out / f"trial{i}.log"
        t0, res = time.time(), {}
        try:
            res = ak.kill_during_write(data, run, log, seed=args.seed + i)
            assert res["latest"] is not None and res["latest_complete"], f"latest is not complete: {res}"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                resumed = ak.resume_and_compare(data, run, log, ref)  # quiet: DeepSpeed's zero_to_fp32 prints
            ok, why = True, f"resumed from {Path(resumed).name if resumed else '(start)'}, bit-exact"
        except AssertionError as e:
            ok, why = False, (str(e).splitlines() or ["assertion failed"])[0][:300]
        passed += ok
        print(f"trial {i}: {'PASS' if ok else 'FAIL'} | killed {res.get('delay_s', '?')} s into the write of step "
              f"{res.get('target_step', '?')} | latest {res.get('latest')} (complete: {res.get('latest_complete')}) | "
              f"partial {res.get('partial')} | {why} | {time.time() - t0:.0f} s", flush=True)
    print(f"\n{passed}/{args.trials} SIGKILL trials: `latest` complete and loadable, resume bit-exact")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
