"""report.md, results.json and plots (matplotlib, Agg) of a ``python -m benchmarks run``."""
from __future__ import annotations

import json
import math
from pathlib import Path

CAVEAT = (
    "**Read the perplexities with care.** SmolLM2-135M ships as a GGUF file whose linear weights "
    "are stored as Q4_1 (asymmetric 4-bit, blocks of 32): its \"full precision\" baseline "
    "already sits on a 4-bit grid, which flatters 4-bit formats whose grid happens to contain "
    "it (a block-32 asymmetric grid re-quantises almost losslessly). The format comparison that "
    "needs real float32 weights is the MiniLM table (all-MiniLM-L6-v2 ships float32 weights).")

GOALS_DOC = [
    ("w8", "W8 weight-only formats within 1% of full-precision perplexity"),
    ("w6a6", "bfp6 W6A6 within 3% of full-precision perplexity"),
    ("bof4_ppl", "perplexity: bof4s_opq <= bof4s <= nf4"),
    ("bof4_mse", "weight MSE (MiniLM): bof4s_opq <= bof4s <= nf4"),
    ("prefill", "blockquant W8 and 4-bit no slower than eager fp32 on the prefill"),
    ("memory", "resident weight memory <= 0.3x float32 for the 4-bit policy"),
]


def _ok(rows) -> list[dict]:
    return [r for r in rows or [] if "error" not in r]


def _failures(rows) -> list[str]:
    return [f"- `{r['label']}` failed: {r['error'][:500]}" for r in rows or [] if "error" in r]


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def goals(results: dict) -> list[tuple[str, str, str]]:
    """(goal, "met" / "missed" / "not measured", evidence) for each goal the data allows."""
    out = []
    ppl = {r["label"]: r for r in _ok(results.get("perplexity"))}
    base = ppl.get("fp32", {}).get("ppl")
    rel = (lambda k: ppl[k]["ppl"] / base - 1) if base else None
    emb = {r["format"]: r for r in results.get("embeddings", [])}
    speed = _ok(results.get("speed"))
    w8 = results.get("settings", {}).get("w8", "mxint8")
    w4 = results.get("settings", {}).get("w4", "nf4")
    for key, text in GOALS_DOC:
        status, evidence = "not measured", ""
        if key == "w8" and rel:
            got = {k: rel(k) for k in ("int8", "mxint8", "mxfp8_e4m3", "bfp8") if k in ppl}
            if got:
                status = "met" if all(v <= 0.01 for v in got.values()) else "missed"
                evidence = ", ".join(f"{k} {100 * v:+.2f}%" for k, v in got.items())
        elif key == "w6a6" and rel and "bfp6 W6A6" in ppl:
            v = rel("bfp6 W6A6")
            status, evidence = ("met" if v <= 0.03 else "missed"), f"{100 * v:+.2f}%"
        elif key == "bof4_ppl" and all(k in ppl for k in ("bof4s_opq", "bof4s", "nf4")):
            a, b, c = (ppl[k]["ppl"] for k in ("bof4s_opq", "bof4s", "nf4"))
            status = "met" if a <= b <= c else "missed"
            evidence = f"{a:.3f} / {b:.3f} / {c:.3f}"
        elif key == "bof4_mse" and all(k in emb for k in ("bof4s_opq", "bof4s", "nf4")):
            a, b, c = (emb[k]["mse"] for k in ("bof4s_opq", "bof4s", "nf4"))
            status = "met" if a <= b <= c else "missed"
            evidence = f"{a:.3e} / {b:.3e} / {c:.3e}"
        elif key == "prefill" and speed:
            eager = next((r for r in speed if r["label"] == "eager fp32"), None)
            bq = [r for r in speed if r["label"].startswith("blockquant")]
            if eager and bq:
                ratios = {r["label"]: r["prefill_s"] / eager["prefill_s"] for r in bq}
                status = "met" if all(v <= 1.0 for v in ratios.values()) else "missed"
                evidence = ", ".join(f"{k}: {v:.2f}x eager fp32 latency" for k, v in ratios.items())
        elif key == "memory" and speed:
            r = next((r for r in speed if r["label"].startswith(f"blockquant {w4}")), None)
            if r:
                whole = r["resident_bytes"] / r["fp32_bytes"]
                layers = (r["quantised_layer_bytes"] / r["quantised_layer_fp32_bytes"]
                          if r["quantised_layer_fp32_bytes"] else float("nan"))
                status = "met" if whole <= 0.3 else "missed"
                evidence = (f"whole model {whole:.3f}x ({_fmt_bytes(r['resident_bytes'])} vs "
                            f"{_fmt_bytes(r['fp32_bytes'])}); quantised linears alone "
                            f"{layers:.3f}x; the tied embedding stays float32")
        out.append((text, status, evidence))
    return out


def markdown(results: dict, images: dict[str, str]) -> str:
    s, m = results["settings"], results["machine"]
    lines = [f"# blockquant benchmark: {Path(s['model']).name}", "",
             f"Command: `{s['command']}`", "",
             f"Machine: {m['cpus']}-core {m['machine']} CPU ({m['processor'] or 'unknown'}), "
             f"{m['platform']}, {m['threads']} torch threads; Python {m['python']}, torch "
             f"{m['torch']}, transformers {m['transformers']}, qcompile {m['qcompile']}. "
             f"Started {results['started']}, total {results['total_s'] / 60:.1f} min. "
             "The CPU may be shared: compare ratios within this run, not absolute times "
             "across runs.", ""]
    if s.get("packaged_model", True):
        lines += [CAVEAT, ""]
    ppl_rows = _ok(results.get("perplexity"))
    if ppl_rows:
        base = ppl_rows[0]["ppl"]
        lines += ["## Perplexity", "",
                  f"Model `{s['model']}`; text: {s['text']}. {s['windows']} non-overlapping "
                  f"windows of {s['window']} tokens (token budget {s['windows'] * s['window']}, "
                  f"{ppl_rows[0]['predictions']} predictions per policy; each window "
                  f"scored alone, {s.get('batch', 1)} windows per forward call). Policies "
                  "quantise every linear layer except `lm_head`; quantised runs are "
                  "`torch.compile(model, backend=\"blockquant\", "
                  f"options={{\"policy\": ..., \"lowering\": \"{s['lowering']}\"}})`. Bits/weight: "
                  "`qcompile.explain` of the compiled model: bytes stored per weight (codes, "
                  "block scales, padding, OPQ outliers, tensor scales) over the quantised "
                  "linears. Compile: the first call's wall time "
                  "(Dynamo, passes, weight quantisation, lowering) minus a later call's; "
                  "s/window: a later call's time per window (the reference ops dequantise "
                  "every weight on each call).", "",
                  "| policy | bits/weight | perplexity | vs fp32 | compile (s) | s/window |",
                  "|---|---|---|---|---|---|"]
        for r in ppl_rows:
            lines.append(f"| `{r['label']}` | {r['bits']:.3f} | {r['ppl']:.3f} | "
                         f"{100 * (r['ppl'] / base - 1):+.2f}% | {r['compile_s']:.1f} | "
                         f"{r['sec_per_window']:.2f} |")
        lines += ["", *_failures(results.get("perplexity")),
                  "", f"![perplexity vs bits per weight]({images['ppl']})", ""]
    if results.get("embeddings"):
        e0 = results["embeddings"][0]
        lines += ["## Weight error and embedding fidelity (all-MiniLM-L6-v2, float32 weights)"
                  if not s.get("encoder") else f"## Weight error and embedding fidelity "
                  f"(`{s['encoder']}`)", "",
                  f"Every linear layer's weight ({e0['weights']:,} weights) in each format, "
                  f"blocks along K. MSE and SQNR over all those weights; bits/weight as stored "
                  f"(codes + scales + side data, padding included). Cosine: similarity of the "
                  f"quantised and float32 sentence embeddings (mean pooling with the attention "
                  f"mask, L2-normalised) of {e0['sentences']} sentences from the same text.", "",
                  "| format | bits/weight stored | MSE | SQNR (dB) | cosine mean | cosine min |",
                  "|---|---|---|---|---|---|"]
        for r in results["embeddings"]:
            lines.append(f"| `{r['format']}` | {r['bits']:.3f} | {r['mse']:.3e} | "
                         f"{r['sqnr_db']:.2f} | {r['cos_mean']:.5f} | {r['cos_min']:.5f} |")
        lines += ["", f"![weight error per format]({images['weights']})", ""]
    if _ok(results.get("speed")):
        sp = _ok(results["speed"])
        e = next((r for r in sp if r["label"] == "eager fp32"), sp[0])
        lines += ["## Speed and memory, compiled vs eager", "",
                  f"Prefill: one {s['prefill']}-token prompt with a KV cache; decode: "
                  f"{s['decode']} greedy steps with `past_key_values` after it. Medians over "
                  f"{s['repeats']} runs after a warm-up run; compile = warm-up wall time minus "
                  "the same work warm. Resident: bytes of the parameters and buffers the "
                  "model holds. Quantised: every linear layer, lm_head too (a tied lm_head gets "
                  "its own packed copy; the embedding table stays float32).", "",
                  "| configuration | prefill (s) | prefill vs eager | decode (ms/token) | "
                  "tokens/s | compile (s) | resident | vs fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sp:
            lines.append(f"| {r['label']} | {r['prefill_s']:.3f} | "
                         f"{r['prefill_s'] / e['prefill_s']:.2f}x | {r['decode_ms']:.1f} | "
                         f"{r['decode_tok_s']:.1f} | {r['compile_s']:.1f} | "
                         f"{_fmt_bytes(r['resident_bytes'])} | "
                         f"{r['resident_bytes'] / r['fp32_bytes']:.3f}x |")
        lines += ["", *_failures(results.get("speed")),
                  "", f"![speed compiled vs eager]({images['speed']})", ""]
    lines += ["## Goals", "", "| goal | status | evidence |", "|---|---|---|"]
    lines += [f"| {g} | {st} | {ev} |" for g, st, ev in goals(results)]
    return "\n".join(lines) + "\n"


def _spread_labels(ax, rows, step=1.075):
    """Label points of similar bits (most 4-bit formats) in a column to their right,
    spaced geometrically (log y axis) so the labels do not overlap, with a thin leader line."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(math.floor(r["bits"]), []).append(r)
    for group in groups.values():
        group.sort(key=lambda r: r["ppl"])
        bits = max(r["bits"] for r in group)
        y = group[0]["ppl"]
        for r in group:
            y = max(y, r["ppl"])
            ax.annotate(r["label"], (r["bits"], r["ppl"]), xytext=(bits + 0.12, y),
                        textcoords="data", fontsize=6.5, va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"})
            y *= step


def plots(results: dict, out: Path) -> dict[str, str]:
    """Write the PNGs that the data allows; returns name -> file name (relative to out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    if _ok(results.get("perplexity")):
        rows = _ok(results["perplexity"])
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for act, marker, name in ((False, "o", "weight-only"), (True, "s", "weight + activation")):
            pts = [r for r in rows if r["label"] != "fp32" and r["act"] == act]
            if pts:
                ax.scatter([r["bits"] for r in pts], [r["ppl"] for r in pts], marker=marker,
                           label=name, zorder=3)
        _spread_labels(ax, [r for r in rows if r["label"] != "fp32"])
        ax.axhline(rows[0]["ppl"], color="grey", ls="--", lw=1,
                   label=f"fp32 ({rows[0]['ppl']:.2f})")
        ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight (quantised linears)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{Path(results['settings']['model']).name}: perplexity vs bits per weight",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "ppl_vs_bits.png", dpi=90)
        plt.close(fig)
        files["ppl"] = "ppl_vs_bits.png"
    if results.get("embeddings"):
        rows = sorted(results["embeddings"], key=lambda r: -r["bits"])
        names = [f"{r['format']} ({r['bits']:.2f} b)" for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 0.28 * len(rows) + 1.4), sharey=True)
        a1.barh(names, [r["sqnr_db"] for r in rows], color="tab:blue")
        a1.set_xlabel("weight SQNR (dB, higher is better)")
        a2.barh(names, [max(1 - r["cos_mean"], 1e-7) for r in rows], color="tab:orange")
        a2.set_xscale("log")
        a2.set_xlabel("1 - mean embedding cosine (lower is better)")
        a1.invert_yaxis()
        for a in (a1, a2):
            a.tick_params(labelsize=7)
            a.grid(axis="x", alpha=0.3)
        fig.suptitle("MiniLM weight error per format", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "weight_error.png", dpi=90)
        plt.close(fig)
        files["weights"] = "weight_error.png"
    if _ok(results.get("speed")):
        rows = _ok(results["speed"])
        names = [r["label"] for r in rows]
        colors = ["tab:gray" if r["kind"] == "eager" else "tab:green" for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.4 * len(rows) + 1.4), sharey=True)
        a1.barh(names, [r["prefill_s"] for r in rows], color=colors)
        a1.set_xlabel(f"prefill latency, {results['settings']['prefill']} tokens (s)")
        a2.barh(names, [r["decode_ms"] for r in rows], color=colors)
        a2.set_xlabel("decode latency (ms/token, log scale)")
        a1.set_xscale("log")
        a2.set_xscale("log")
        a1.set_xlabel(a1.get_xlabel()[:-1] + ", log scale)")
        a1.invert_yaxis()
        for a in (a1, a2):
            a.tick_params(labelsize=7)
            a.grid(axis="x", alpha=0.3)
        fig.suptitle("compiled (green) vs eager (grey); lower is better", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=90)
        plt.close(fig)
        files["speed"] = "speed.png"
    return files


def save_json(results: dict, out: Path) -> None:
    """results.json alone: written after each section, so a long run that stops keeps what it
    measured (``write(json.loads(...), out)`` renders it later)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


def write(results: dict, out: Path) -> Path:
    save_json(results, out)
    images = plots(results, out)
    path = out / "report.md"
    path.write_text(markdown(results, images))
    return path
