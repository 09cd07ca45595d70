"""Can a LoRA be read off what the prompt does to the model, with no training at all?

    python tests/bench/bench_context_steering.py --suite SUITE_DIR --tasks a,b [--texts eval]
        [--alphas 0.5,1] [--fit] [--rank 8] [--ridge 1.0]

An exploratory probe (EVAL.md, session 48), not a generator. For each task it reads the task's
in-context prompt (its description and episode 0's demonstrations, as the `in-context` variant
does) and builds a v_proj LoRA from two forward passes, no gradient step:

* **constant**: per layer l, the mean residual after attention over the demonstrations' tokens
  read in the prompt is the target; the demonstrations read alone (after the text-start token,
  as adapters are scored) are calibrated layer by layer in one pass by the constant value shift
  u_l (192,) whose o_proj image best matches what is left of the mean difference. Realised as a
  rank-1 LoRA dW_v = u_l a_l^T, where a_l is a 'constant detector' (ridge fit of a_l . x = 1
  over the v_proj inputs of the demonstrations read alone; the table shows a . x's mean and
  spread on the scored texts at four layers).
* **fit** (``--fit``): per layer, a rank-``--rank`` v_proj delta fitted by ridge least squares so
  that each demonstration token's residual after attention moves by its own in-prompt minus
  alone difference, through the layer's real attention weights (eager attention). One pass per
  layer.

Each is scored at strength alpha on 32 of the task's texts (``--texts`` eval or train) beside the
base model and the prompt itself; "share" is the part of the prompt's log-perplexity gain over
the base model that the adapter recovers. Run it alone on the box.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import jobs  # noqa: E402,F401  (registers the project's presets: study, demo, ...)
from icm.config import load_config  # noqa: E402
from icm.eval.baselines import in_context_prefix, score_in_context  # noqa: E402
from icm.evaluation import _encode, score_texts  # noqa: E402
from icm.models import right_pad, text_start_token_id  # noqa: E402
from icm.task_vectors import clip_demos, sample_demos  # noqa: E402

# The study preset's settings: the demonstrations the in-context variant reads, and how texts
# are cut and batched when scored.
STUDY = load_config("study")
PROMPT_SETTINGS = STUDY.task_vectors
MAX_LENGTH, BATCH = STUDY.evaluate.max_length, STUDY.evaluate.batch_size


class Steering:
    """Hooks on a Llama-style model: capture residuals, calibrate and apply v_proj deltas."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.layers = model.model.layers
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.start = text_start_token_id(tokenizer)
        # (D, kv x head_dim): the o_proj image of a value shift shared by a kv head's q heads
        self.o_weights = [layer.self_attn.o_proj.weight.detach().float() for layer in self.layers]
        self.expand = [self._expand(w) for w in self.o_weights]
        self.expand_pinv = [torch.linalg.pinv(m) for m in self.expand]
        self.mode, self.mask, self.alpha, self.grab = None, None, 1.0, None
        # per layer, from the last pass: residual in, residual after attention, v_proj input
        self.resid, self.mids, self.xs = {}, {}, {}
        self.targets: list[torch.Tensor] = []  # (D,) per layer: the prompt's mean mid residual
        self.constant: list[torch.Tensor | None] = []  # (kv x hd,) per layer: calibrated shifts
        self.detector: list[torch.Tensor] = []  # (D,) per layer: a with a . x ~ 1
        self.delta: list[torch.Tensor | None] = [None] * len(self.layers)  # (kv x hd, D) per layer
        self.attn = None
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._pre(index), with_kwargs=True)
            layer.self_attn.v_proj.register_forward_hook(self._v(index))
            layer.self_attn.o_proj.register_forward_hook(self._o(index))
            layer.self_attn.register_forward_hook(self._attention(index))

    def _expand(self, weight: torch.Tensor) -> torch.Tensor:
        group = self.heads // self.kv_heads
        hd = self.head_dim
        return torch.cat([sum(weight[:, h * hd:(h + 1) * hd]
                              for h in range(g * group, (g + 1) * group))
                          for g in range(self.kv_heads)], dim=1)

    def _pre(self, i):
        def hook(module, args, kwargs):
            if self.mode:
                self.resid[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _v(self, i):
        def hook(module, args, out):
            x = args[0]
            if self.mode == "collect_x" or (self.mode == "grab" and i == self.grab):
                self.xs[i] = x.detach()
            if self.mode in ("apply", "grab") and self.delta[i] is not None:
                return out + self.alpha * (x @ self.delta[i].T)
            return None
        return hook

    def _o(self, i):
        def hook(module, args, out):
            if self.mode not in ("capture", "calibrate", "grab"):
                return None
            mid = self.resid[i] + out  # (B, T, D) residual after attention
            self.mids[i] = mid.detach()
            if self.mode == "calibrate":
                weights = self.mask[..., None]  # (B, T, 1)
                current = (mid * weights).sum((0, 1)) / weights.sum()
                u = self.expand_pinv[i] @ (self.targets[i] - current)  # (kv x hd,)
                self.constant[i] = u
                return out + self.expand[i] @ u
            return None
        return hook

    def _attention(self, i):
        def hook(module, args, out):
            if self.mode == "grab" and i == self.grab:
                self.attn = out[1].detach()  # (B, H, T, T)
        return hook

    def forward(self, mode: str, sequences: list[list[int]], masks: list[list[int]] | None = None,
                **kwargs) -> None:
        ids, attention = right_pad(sequences, self.tokenizer.pad_token_id)  # (B, T) each
        self.mask = torch.zeros(ids.shape)  # (B, T): the tokens a pass averages over
        for row, mask in enumerate(masks or []):
            self.mask[row, :len(mask)] = torch.tensor(mask, dtype=torch.float)
        self.mode = mode
        try:
            with torch.inference_mode():
                self.model(input_ids=ids, attention_mask=attention, **kwargs)
        finally:
            self.mode = None

    # ------------------------------------------------------------------ the demonstrations

    def demonstrations(self, task) -> dict:
        """The prompt's ids, each demonstration alone, per demonstration the positions (in the
        prompt, alone) that hold the same tokens (the first is dropped: its leading space merges
        into it in the prompt), and the prompt's residual after attention at every layer (read
        once, for both adapters)."""
        demos = clip_demos(sample_demos(task, PROMPT_SETTINGS, episode=0),
                           PROMPT_SETTINGS.max_demo_chars)
        prompt = in_context_prefix(task.description, demos, PROMPT_SETTINGS.max_demo_chars)
        encoded = self.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = [self.start, *encoded["input_ids"]]
        alone, pairs, position, in_mask = [], [], 0, [0] * len(ids)
        for demo in demos:
            text = demo.strip()
            begin = prompt.index(text, position)
            position = begin + len(text)
            # tokens overlapping the text: its first token starts at the space before it
            in_prompt = [k + 1 for k, (s, e) in enumerate(encoded["offset_mapping"])
                         if s < position and e > begin]
            for k in in_prompt:
                in_mask[k] = 1
            own = [self.start, *self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            a, b = in_prompt[1:], list(range(2, len(own)))
            same = [k for k in range(min(len(a), len(b))) if ids[a[k]] == own[b[k]]]
            pairs.append(([a[k] for k in same], [b[k] for k in same]))
            alone.append(own)
        self.forward("capture", [ids])
        prompt_mids = [self.mids[i][0] for i in range(len(self.layers))]  # (T, D) per layer
        return {"ids": ids, "in_mask": in_mask, "alone": alone, "pairs": pairs, "demos": demos,
                "prompt_mids": prompt_mids}

    # ------------------------------------------------------------------ the two adapters

    def fit_detector(self, texts: list[str]) -> None:
        """a_l per layer: ridge solution of a . x = 1 over the v_proj inputs of ``texts``."""
        sequences = _encode(self.tokenizer, texts, MAX_LENGTH)[0]
        inputs = [[] for _ in self.layers]
        for begin in range(0, len(sequences), BATCH):
            chunk = sequences[begin:begin + BATCH]
            self.forward("collect_x", chunk, [[1] * len(s) for s in chunk])
            for i in range(len(self.layers)):
                inputs[i].append(self.xs[i][self.mask.bool()].float())
        self.detector = []
        for stacked in (torch.cat(x) for x in inputs):  # (N, D)
            gram = stacked.T @ stacked
            ridge = 1e-2 * gram.diagonal().mean()
            self.detector.append(torch.linalg.solve(gram + ridge * torch.eye(len(gram)),
                                                    stacked.T @ torch.ones(len(stacked))))

    def constant_delta(self, demos: dict) -> None:
        weights = torch.tensor(demos["in_mask"], dtype=torch.float)[:, None]  # (T, 1)
        self.targets = [(mid * weights).sum(0) / weights.sum() for mid in demos["prompt_mids"]]
        self.constant = [None] * len(self.layers)
        self.delta = [None] * len(self.layers)
        masks = [[0] + [1] * (len(s) - 1) for s in demos["alone"]]  # not the text-start token
        self.forward("calibrate", demos["alone"], masks)
        self.delta = [torch.outer(u, a) for u, a in zip(self.constant, self.detector)]

    def fitted_delta(self, demos: dict, rank: int, ridge: float) -> None:
        target = demos["prompt_mids"]  # (T, D) per layer
        self.delta, self.alpha = [None] * len(self.layers), 1.0
        for layer in range(len(self.layers)):
            self.grab = layer
            self.forward("grab", demos["alone"], output_attentions=True)
            self.delta[layer] = self._fit_layer(layer, demos, target[layer], rank, ridge)
        self.grab = None

    def _fit_layer(self, layer: int, demos: dict, target: torch.Tensor, rank: int,
                   ridge: float) -> torch.Tensor:
        x, attn, mid = self.xs[layer].float(), self.attn.float(), self.mids[layer].float()
        z = torch.einsum("bhtj,bjd->bhtd", attn, x)  # (B, H, T, D) attention-averaged inputs
        zs, goals, inputs = [], [], []
        for row, (in_prompt, own) in enumerate(demos["pairs"]):
            if own:
                zs.append(z[row, :, own])
                goals.append(target[in_prompt] - mid[row, own])
                inputs.append(x[row, 1:len(demos["alone"][row])])
        z, goal = torch.cat(zs, dim=1), torch.cat(goals)  # (H, N, D), (N, D)
        basis = torch.linalg.svd(torch.cat(inputs), full_matrices=False).Vh[:rank]  # (r, D)
        coords = z @ basis.T  # (H, N, r)
        hd, group = self.head_dim, self.heads // self.kv_heads
        w_o = self.o_weights[layer]
        size = hd * rank
        unknowns = self.kv_heads * size
        lhs, rhs = torch.zeros(unknowns, unknowns), torch.zeros(unknowns)
        # unknown B (kv x hd, r): residual change_t = sum_h W_o,h B_g(h) coords[h, t]
        for h in range(self.heads):
            g = h // group
            w_h = w_o[:, h * hd:(h + 1) * hd]
            rhs[g * size:(g + 1) * size] += ((w_h.T @ goal.T) @ coords[h]).reshape(-1)
            for k in range(self.heads):
                g2 = k // group
                block = torch.kron(w_h.T @ w_o[:, k * hd:(k + 1) * hd], coords[h].T @ coords[k])
                lhs[g * size:(g + 1) * size, g2 * size:(g2 + 1) * size] += block
        solved = torch.linalg.solve(lhs + ridge * lhs.diagonal().mean() * torch.eye(len(lhs)), rhs)
        return solved.reshape(self.kv_heads * hd, rank) @ basis  # (kv x hd, D)

    def score(self, texts: list[str], alpha: float | None = None) -> float:
        """Perplexity of ``texts`` as adapters are scored: the base model, or with the current
        deltas at strength ``alpha``."""
        self.mode, self.alpha = ("apply", alpha) if alpha is not None else (None, 1.0)
        try:
            return score_texts(self.model, self.tokenizer, texts, max_length=MAX_LENGTH,
                               batch_size=BATCH).perplexity
        finally:
            self.mode = None

    def detector_spread(self, texts: list[str], layers: tuple[int, ...]
                        ) -> list[tuple[float, float]]:
        sequences = _encode(self.tokenizer, texts[:BATCH], MAX_LENGTH)[0]
        self.forward("collect_x", sequences, [[1] * len(s) for s in sequences])
        values = [self.xs[i][self.mask.bool()].float() @ self.detector[i] for i in layers]
        return [(round(float(v.mean()), 3), round(float(v.std()), 3)) for v in values]


def share(base: float, prompt: float, adapter: float) -> float:
    """The part of the prompt's log-perplexity gain over the base model the adapter recovers."""
    return (math.log(base) - math.log(adapter)) / (math.log(base) - math.log(prompt))


def main(argv: list[str] | None = None) -> list[dict]:
    from icm.models import load_base_model
    from icm.tasks import load_task

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, help="a built suite folder (one folder a task)")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--texts", choices=["eval", "train"], default="eval")
    parser.add_argument("--alphas", default="0.5,1")
    parser.add_argument("--fit", action="store_true", help="also the per-token fitted delta")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ridge", type=float, default=1.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_base_model("smollm2-135m")
    model.set_attn_implementation("eager")  # the fit reads each layer's attention weights
    steering = Steering(model, tokenizer)
    alphas = [float(a) for a in args.alphas.split(",")]
    rows = []
    for name in args.tasks.split(","):
        task = load_task(Path(args.suite) / name)
        texts = (task.eval_texts() if args.texts == "eval" else task.train_texts())[:32]
        demos = steering.demonstrations(task)
        steering.fit_detector([demo.strip() for demo in demos["demos"]])
        prefix = in_context_prefix(task.description, demos["demos"], PROMPT_SETTINGS.max_demo_chars)
        prompted = score_in_context(model, tokenizer, texts, prefix, max_length=MAX_LENGTH,
                                    batch_size=BATCH).perplexity
        last = len(steering.layers) - 1
        row = {"task": name, "base": steering.score(texts), "in-context": prompted,
               "a.x (layers 0, 10, 20, last)": steering.detector_spread(texts, (0, 10, 20, last))}
        steering.constant_delta(demos)
        for alpha in alphas:
            row[f"constant a={alpha}"] = steering.score(texts, alpha)
        if args.fit:
            steering.fitted_delta(demos, args.rank, args.ridge)
            for alpha in alphas:
                row[f"fit a={alpha}"] = steering.score(texts, alpha)
        for key in [k for k in row if k.startswith(("constant", "fit"))]:
            row[f"share {key}"] = share(row["base"], row["in-context"], row[key])
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
    return rows


if __name__ == "__main__":
    main()
