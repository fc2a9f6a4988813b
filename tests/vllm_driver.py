"""Run by tests/test_vllm.py and bench/bench_vllm.py with the vLLM environment's Python (.venv-vllm):
one vLLM engine, several generate calls, results as JSON.

    python tests/vllm_driver.py JOB.json OUT.json

JOB: {"model": DIR, "engine": {LLM kwargs}, "calls": [{"name", "prompts": [...] | "conversations": [[{role,
content}, ...], ...], "params": {SamplingParams kwargs} | [one per prompt]}]} — conversations go through
``LLM.chat`` (the model's chat template, as /v1/chat/completions). OUT: {"load_s", "calls": {name: {"wall_s", "outputs": [{"token_ids",
"text", "finish_reason"}]}}}. Needs no network: HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(job_path: str, out_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    job = json.loads(open(job_path).read())
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(job["model"], **job.get("engine", {}))
    result = {"load_s": time.perf_counter() - t0, "calls": {}}
    for call in job["calls"]:
        params = call["params"]
        sp = [SamplingParams(**p) for p in params] if isinstance(params, list) else SamplingParams(**params)
        t = time.perf_counter()
        if "conversations" in call:
            outs = llm.chat(call["conversations"], sp, use_tqdm=False)
        else:
            outs = llm.generate(call["prompts"], sp, use_tqdm=False)
        wall = time.perf_counter() - t
        result["calls"][call["name"]] = {
            "wall_s": wall,
            "outputs": [
                {"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text,
                 "finish_reason": o.outputs[0].finish_reason, "prompt_len": len(o.prompt_token_ids or []),
                 "prompt_token_ids": list(o.prompt_token_ids or [])}
                for o in outs
            ],
        }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
