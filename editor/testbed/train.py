"""Train the embedded testbed model on CPU.

    python -m editor.testbed.train --out editor/testbed/model [--seed 0] [--minutes N]

Builds the seeded corpus and the character tokenizer, trains a ~1M-parameter
``LlamaForCausalLM`` with AdamW + warmup/cosine schedule, saves model
(safetensors, float32), tokenizer and generation config into ``--out``, writes
``probe.jsonl`` / ``eval.jsonl`` into ``--data-out`` (default: the package's
``data/``) and prints the eval scorecard.

The run is deterministic for a seed and a number of steps (``--steps``).
``--minutes N`` instead times the first steps and sets the step count to fit
in about N minutes (machine-dependent, so not reproducible across machines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

# Busy-waiting OpenMP workers collapse throughput when the cores are shared with
# other processes; passive waiting costs little when they are not.  (Only has an
# effect if torch is not imported yet.)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from editor.eval.scorecard import format_table, score

from . import DATA_DIR, corpus
from .tokenizer import build_tokenizer

# sampling weight of each skill in a training batch
SKILL_WEIGHTS = {"math": 0.40, "python": 0.24, "facts_en": 0.12, "facts_fr": 0.12, "facts_de": 0.12}


def model_config(vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        rms_norm_eps=1e-5, initializer_range=0.02, rope_theta=10000.0)


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


class Batcher:
    """Deterministic skill-weighted sampling; length-sorted within a pool of batches."""

    def __init__(self, encoded, skills, batch_size, seed, pool=16):
        self.enc = encoded  # list of (ids, prompt_len)
        self.by_skill = {}
        for i, s in enumerate(skills):
            self.by_skill.setdefault(s, []).append(i)
        self.names = sorted(self.by_skill)
        self.weights = [SKILL_WEIGHTS.get(s, 0.1) for s in self.names]
        self.bs, self.pool = batch_size, pool
        self.rng = random.Random(f"batches-{seed}")
        self.queue = []

    def _refill(self):
        picks = []
        for s in self.rng.choices(self.names, weights=self.weights, k=self.bs * self.pool):
            picks.append(self.rng.choice(self.by_skill[s]))
        picks.sort(key=lambda i: len(self.enc[i][0]))
        chunks = [picks[k:k + self.bs] for k in range(0, len(picks), self.bs)]
        self.rng.shuffle(chunks)
        self.queue.extend(chunks)

    def next(self, pad_id, prompt_weight):
        if not self.queue:
            self._refill()
        idx = self.queue.pop()
        T = max(len(self.enc[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        w = torch.zeros((len(idx), T - 1))
        for r, i in enumerate(idx):
            seq, plen = self.enc[i]
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
            # target position t predicts token t+1; answer tokens (+ EOS) start at plen
            w[r, :len(seq) - 1] = prompt_weight
            w[r, plen - 1:len(seq) - 1] = 1.0
        return ids, mask, w


def lr_at(step, total, peak, warmup, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    prog = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m editor.testbed.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="model output directory")
    ap.add_argument("--data-out", type=Path, default=DATA_DIR, help="where probe.jsonl / eval.jsonl go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2800)
    ap.add_argument("--minutes", type=float, default=None, help="fit the step count to ~N minutes")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--prompt-weight", type=float, default=0.02, help="loss weight of prompt tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=500, help="score a probe subset every N steps")
    args = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    train = corpus.generate("train", args.seed)
    probe = corpus.generate("probe", args.seed)
    evals = corpus.generate("eval", args.seed)
    tok = build_tokenizer(corpus.charset(args.seed))
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    enc_prompts = tok([e["prompt"] for e in train])["input_ids"]
    enc_full = tok([corpus.text(e) for e in train])["input_ids"]
    encoded = []
    for p, full in zip(enc_prompts, enc_full):
        assert full[:len(p)] == p, "tokenizer is not prefix-consistent"
        encoded.append((full + [eos], len(p)))
    batcher = Batcher(encoded, [e["skill"] for e in train], args.batch_size, args.seed)

    cfg = model_config(len(tok), bos, eos, pad)
    model = LlamaForCausalLM(cfg).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[testbed] {len(train)} train texts, vocab {len(tok)}, {n_params:,} parameters, "
          f"{args.threads} threads", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    total = args.steps
    model.train()
    t_train = time.time()
    run_loss, run_n = 0.0, 0
    step = 0
    while step < total:
        lr = lr_at(step, total, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, mask, w = batcher.next(pad, args.prompt_weight)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        loss = (ce * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        run_n += 1
        if args.minutes is not None and step == 30:
            per_step = (time.time() - t_train) / step
            total = max(step + 1, int(args.minutes * 60 / per_step))
            print(f"[testbed] {per_step:.3f}s/step -> {total} steps for ~{args.minutes} min", flush=True)
        if step % args.log_every == 0 or step == total:
            el = time.time() - t_train
            print(f"[testbed] step {step}/{total} loss {run_loss / run_n:.4f} lr {lr:.2e} "
                  f"{el:.0f}s elapsed, eta {el / step * (total - step):.0f}s", flush=True)
            run_loss, run_n = 0.0, 0
        if args.eval_every and step % args.eval_every == 0 and step < total:
            res = score(model, tok, probe[::4], batch_size=64)
            print("[testbed] probe subset: " + ", ".join(
                f"{s} {100 * r['exact_match']:.0f}%" for s, r in res["skills"].items()), flush=True)
            model.train()
    train_s = time.time() - t_train

    model.eval()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False, num_beams=1,
        max_new_tokens=24)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_jsonl(args.data_out / "probe.jsonl", probe)
    write_jsonl(args.data_out / "eval.jsonl", evals)

    res = score(model, tok, evals, batch_size=64)
    print(format_table(res))
    print(format_table(res, by="phrasings"))
    wrong = [r for r in res["records"] if not r["correct"]]
    for r in wrong[:20]:
        print(f"  WRONG {r['phrasing']}: {r['prompt']!r} -> {r['prediction']!r} (want {r['answer']!r})")
    total_s = time.time() - t0
    print(f"[testbed] trained {step} steps in {train_s:.0f}s; total {total_s:.0f}s; "
          f"{n_params:,} parameters; saved to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
