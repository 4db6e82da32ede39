"""The emulator's mutation check: removes each barrier call of the CUDA block programs in
turn (every `block.sync();` and `grid.sync();` of PROGRAMS), builds the emulator
on the mutant, runs the emulated tests on it and reports which test killed it, or that
it survived. A barrier whose removal no test notices is either redundant or untested;
the redundant ones are listed in EQUIVALENT, with the reason, and not run.

    python tests/emulator/mutations.py            # every barrier: 7 minutes on 2 busy cores
    python tests/emulator/mutations.py -k persistent_program   # the persistent kernel only

Each mutant is a copy of csrc/ and of the emulator in a temporary directory, built there
(the emulator includes the block programs by relative path) and tested in a fresh
process (one emulator library per process). Exit status 1 if a mutant survived. Not part
of the test run: each mutant is a build.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The block programs, and the emulated tests that run them (the persistent tests run the
# step kernels too, with a projection).
PROGRAMS = {
    "csrc/cuda/lstm_kernels.cuh": ["tests/test_cuda_emulated.py",
                                   "tests/test_cuda_persistent_emulated.py"],
    "csrc/cuda/persistent_program.cuh": ["tests/test_cuda_persistent_emulated.py"],
}
BARRIER = re.compile(r"\b(?:block|grid)\.sync\(\);")
FUNCTION = re.compile(r"\bvoid (\w+)\(")
# Barriers that order nothing a later barrier does not order anyway (by the function that
# holds them): removing them cannot fail, here or on a GPU.
EQUIVALENT = {
    "persistent_program.cuh:load_weights":
        "the weights are first read by multiply(), which every path reaches only through "
        "the barrier after stage(), itself after load_weights()",
}


def barriers():
    """(path, line number, the function holding it, line) of every barrier call in the
    block programs."""
    found = []
    for path in PROGRAMS:
        function = None
        with open(os.path.join(ROOT, path)) as f:
            for number, line in enumerate(f, 1):
                code = line.split("//")[0]
                match = FUNCTION.search(code)
                function = match.group(1) if match else function
                if BARRIER.search(code):
                    found.append((path, number, function, line.strip()))
    return found


def run_mutant(path, number, workdir):
    """Builds the emulator with the barrier at path:number removed and runs the emulated
    tests on it; returns (killed, the first failing test or the end of pytest's output)."""
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(workdir, "csrc"))
    os.makedirs(os.path.join(workdir, "tests", "emulator"))
    source = os.path.join(workdir, "tests", "emulator", "emulator.cpp")
    shutil.copy(os.path.join(HERE, "emulator.cpp"), source)
    mutated = os.path.join(workdir, path)
    with open(mutated) as f:
        lines = f.readlines()
    lines[number - 1] = BARRIER.sub(";  /* mutant: barrier removed */", lines[number - 1], 1)
    with open(mutated, "w") as f:
        f.writelines(lines)
    env = dict(os.environ, FUSED_LSTM_EMULATOR_SOURCE=source,
               FUSED_LSTM_EMULATOR_BUILD=os.path.join(workdir, "build"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
         *PROGRAMS[path]],
        cwd=ROOT, env=env, capture_output=True, text=True)
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    if result.returncode == 1 and failed:
        return True, failed[0][len("FAILED "):].split(" - ")[0]
    if result.returncode != 0:
        raise RuntimeError(f"pytest on the mutant {path}:{number} did not run:\n"
                           + result.stdout[-3000:] + result.stderr[-3000:])
    return False, result.stdout.strip().splitlines()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only the barriers whose path:line contains this")
    args = parser.parse_args()
    survivors = 0
    for path, number, function, line in barriers():
        where = f"{path}:{number}"
        if args.k not in where:
            continue
        equivalent = EQUIVALENT.get(f"{os.path.basename(path)}:{function}")
        if equivalent:
            print(f"{where} `{line}` ({function}) -> equivalent, not run: {equivalent}")
            continue
        with tempfile.TemporaryDirectory(prefix="fused_lstm_mutant_") as workdir:
            killed, detail = run_mutant(path, number, workdir)
        survivors += not killed
        print(f"{where} `{line}` ({function}) -> "
              f"{'killed by ' if killed else 'SURVIVED: '}{detail}", flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
