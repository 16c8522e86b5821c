#!/usr/bin/env python3
"""Independent reference for Sherpa Swarm's model engine.

Reads a Llama GGUF file with the `gguf` package, dequantizes every tensor to
float64 with numpy, tokenizes with a from-scratch byte-level BPE (GPT-2 style,
with SmolLM's single-digit split) and renders the chat template with jinja2.
It then runs greedy decoding with a plain numpy Llama forward pass written
the HF way: Q/K rows are un-permuted back to HF layout and RoPE rotates
halves, whereas the Rust engine keeps GGUF's permuted rows and rotates
interleaved pairs. Nothing here shares code with the Rust side.

Every weight is dequantized and all arithmetic is float64 ("dequantized"
mode): this defines the model's exact function. An engine whose quantized
matmuls also round the activations to 8 bits (ggml's Q8_1/Q8_0 dot products)
deviates from it by its rounding noise; see tests/reference_smollm2.rs.

Usage:
    pip install gguf numpy regex jinja2
    python3 reference/gguf_reference.py MODEL.gguf > reference/expected/smollm2-135m-q4_1.json
"""
import hashlib
import json
import sys

import jinja2
import numpy as np
import regex
from gguf import GGUFReader
from gguf.quants import dequantize

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works in simple terms.",
    "What are three good habits for writing clean code?",
]
MAX_NEW_TOKENS = 32
TOP_LOGITS = 64


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


# ---------------------------------------------------------------- tokenizer
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class ByteLevelBPE:
    def __init__(self, tokens, merges, token_types, split_digits):
        self.vocab = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self.specials = sorted((t for t, ty in zip(tokens, token_types) if ty in (3, 4)), key=len, reverse=True)
        self.split_digits = split_digits

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            best = None
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return [self.vocab[p] for p in parts]

    def encode_plain(self, text):
        pieces = regex.split(r"(\p{N})", text) if self.split_digits else [text]
        ids = []
        for piece in pieces:
            if not piece:
                continue
            for word in GPT2_PATTERN.findall(piece):
                mapped = "".join(self.byte_map[b] for b in word.encode("utf-8"))
                ids.extend(self.bpe(mapped))
        return ids

    def encode(self, text):
        ids, i, start = [], 0, 0
        while i < len(text):
            hit = next((s for s in self.specials if text.startswith(s, i)), None)
            if hit:
                ids.extend(self.encode_plain(text[start:i]))
                ids.append(self.vocab[hit])
                i += len(hit)
                start = i
            else:
                i += 1
        ids.extend(self.encode_plain(text[start:]))
        return ids


# -------------------------------------------------------------------- model
def load_weights(reader):
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        weights[t.name] = w.reshape(shape)
    return weights


class DenseMatrix:
    def __init__(self, w):
        self.w = w

    def __call__(self, x):
        return x @ self.w.T


def unpermute(w, heads):
    # Inverse of llama.cpp's convert permute: back to HF (rotate-half) row order.
    out, cols = w.shape
    return w.reshape(heads, out // heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class Llama:
    def __init__(self, reader, mode):
        g = lambda k: field(reader, f"llama.{k}")
        self.n_layers = int(g("block_count"))
        self.hidden = int(g("embedding_length"))
        self.heads = int(g("attention.head_count"))
        self.kv_heads = int(g("attention.head_count_kv"))
        self.head_dim = self.hidden // self.heads
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.theta = float(g("rope.freq_base"))
        w = load_weights(reader)

        def matrix(name, heads=None):
            return DenseMatrix(unpermute(w[name], heads) if heads else w[name])

        self.emb = w["token_embd.weight"]
        self.out = matrix("output.weight" if "output.weight" in w else "token_embd.weight")
        self.out_norm = w["output_norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"blk.{i}."
            self.layers.append(dict(
                attn_norm=w[p + "attn_norm.weight"],
                q=matrix(p + "attn_q.weight", self.heads),
                k=matrix(p + "attn_k.weight", self.kv_heads),
                v=matrix(p + "attn_v.weight"),
                o=matrix(p + "attn_output.weight"),
                ffn_norm=w[p + "ffn_norm.weight"],
                gate=matrix(p + "ffn_gate.weight"),
                up=matrix(p + "ffn_up.weight"),
                down=matrix(p + "ffn_down.weight"),
            ))
        inv = 1.0 / self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self.inv_freq = inv

    def rope(self, x, positions):
        # x: (heads, seq, head_dim), HF convention.
        angles = np.outer(positions, self.inv_freq)  # (seq, head_dim/2)
        emb = np.concatenate([angles, angles], axis=-1)
        return x * np.cos(emb) + rotate_half(x) * np.sin(emb)

    def forward(self, ids, cache):
        start = cache["len"]
        seq = len(ids)
        positions = np.arange(start, start + seq)
        x = self.emb[ids]
        group = self.heads // self.kv_heads
        for li, l in enumerate(self.layers):
            h = rms_norm(x, l["attn_norm"], self.eps)
            q = l["q"](h).reshape(seq, self.heads, self.head_dim).transpose(1, 0, 2)
            k = l["k"](h).reshape(seq, self.kv_heads, self.head_dim).transpose(1, 0, 2)
            v = l["v"](h).reshape(seq, self.kv_heads, self.head_dim).transpose(1, 0, 2)
            q, k = self.rope(q, positions), self.rope(k, positions)
            if li in cache:
                k = np.concatenate([cache[li][0], k], axis=1)
                v = np.concatenate([cache[li][1], v], axis=1)
            cache[li] = (k, v)
            k_rep = np.repeat(k, group, axis=0)
            v_rep = np.repeat(v, group, axis=0)
            att = q @ k_rep.transpose(0, 2, 1) / np.sqrt(self.head_dim)  # (heads, seq, total)
            total = start + seq
            mask = np.arange(total)[None, :] > positions[:, None]
            att = np.where(mask[None], -np.inf, att)
            att = np.exp(att - att.max(axis=-1, keepdims=True))
            att /= att.sum(axis=-1, keepdims=True)
            y = (att @ v_rep).transpose(1, 0, 2).reshape(seq, self.heads * self.head_dim)
            x = x + l["o"](y)
            h = rms_norm(x, l["ffn_norm"], self.eps)
            gate = l["gate"](h)
            x = x + l["down"]((gate / (1 + np.exp(-gate))) * l["up"](h))
        cache["len"] = start + seq
        last = rms_norm(x[-1], self.out_norm, self.eps)
        return self.out(last[None, :])[0]


def main():
    path = sys.argv[1]
    reader = GGUFReader(path)
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = field(reader, "tokenizer.ggml.merges")
    types = field(reader, "tokenizer.ggml.token_type")
    pre = field(reader, "tokenizer.ggml.pre")
    eos = int(field(reader, "tokenizer.ggml.eos_token_id"))
    template = field(reader, "tokenizer.chat_template")
    tok = ByteLevelBPE(tokens, merges, types, split_digits=(pre == "smollm"))
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    modes = {}
    for mode in ("dequantized",):
        modes[mode] = run_mode(Llama(reader, mode), tok, template, eos, mode)

    # Tokenizer cases: text -> ids with no template.
    token_cases = ["Hello, world!", "The year 2024 has 366 days.", "  spaces\tand\nnewlines  ",
                   "naïve café — ünïcödé 東京", "<|im_start|>user\nhi<|im_end|>\n"]
    json.dump({
        "model_sha256": sha,
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": eos,
        "modes": modes,
        "tokenizer_cases": [{"text": t, "ids": tok.encode(t)} for t in token_cases],
    }, sys.stdout, indent=1)
    print()


def run_mode(model, tok, template, eos, mode):
    results = []
    for prompt in PROMPTS:
        rendered = jinja2.Template(template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tok.encode(rendered)
        cache = {"len": 0}
        logits = model.forward(prompt_ids, cache)
        first = logits
        generated, margins = [], []
        for _ in range(MAX_NEW_TOKENS):
            order = np.argsort(-logits, kind="stable")
            nxt = int(order[0])
            margins.append(float(logits[order[0]] - logits[order[1]]))
            generated.append(nxt)
            if nxt == eos:
                break
            logits = model.forward([nxt], cache)
        top = np.argsort(-first, kind="stable")[:TOP_LOGITS]
        results.append({
            "prompt": prompt,
            "rendered": rendered,
            "prompt_ids": [int(i) for i in prompt_ids],
            "generated_ids": generated,
            "top1_margins": margins,
            "first_logits_top": [[int(i), float(first[i])] for i in top],
        })
        print(f"{mode}: {prompt!r}: {len(generated)} tokens, min margin {min(margins):.4f}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
