"""In-LLM comparison methods (FastV, PyramidDrop, SparseVLM, in-LLM random pruning) on the p-MoD core.

A reference written here recomputes each official algorithm step by step the way the official code
does it (batch of one; dropped tokens really cut out of the sequence; HF's eager attention weights
of the plain HF layers; positions kept or renumbered), on a second copy of the tiny model. It must
match the implementation's kept tokens and logits, for the prefill and for every cached decode step.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_inputs
from pmod_bench.methods import MethodError, apply_method, parse_method_spec
from pmod_bench.methods.sparsevlm import SCHEDULES
from pmod_bench.model.cache import PMoDCacheLayer, output_cache
from pmod_bench.model.presets import build_preset

SIZES = [(64, 48), (40, 90), (96, 96)]
QUESTIONS = ["What is shown in the image?", "Is there a red circle? Answer yes or no.", "Count the shapes."]
SPECS = ["fastv:k=2,keep=0.5", "pyramiddrop:layers=2-4-6,lam=0.5", "sparsevlm:layers=2-4-5,retain=192", "random_llm:k=3,keep=0.4"]


@pytest.fixture(scope="module")
def models():
    """(method model, reference model): two copies of the same tiny vanilla LLaVA-NeXT (eager for the reference)."""
    torch.set_num_threads(1)
    model, _ = build_preset("tiny", pmod=None, seed=0)
    ref, _ = build_preset("tiny", pmod=None, seed=0, attn_implementation="eager")
    return model, ref


# ---------------------------------------------------------------------------------- the reference
def _eager_rows(layer, x, pos, rotary):
    """HF eager attention weights of ``layer`` on x (1, n, d) at positions ``pos``: (H, n, n)."""
    cos, sin = rotary(x, pos)
    n = x.shape[1]
    mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
    _, w = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=mask)
    return w[0]


def _official_cluster(x, c):
    """SparseVLM's ``cluster_and_merge`` (DPC-kNN) on (n, C), the official steps; ties by position."""
    n, C = x.shape
    dist = ((x[:, None] - x[None]) ** 2).sum(-1).sqrt() / C ** 0.5
    dn = torch.sort(dist, dim=-1, stable=True).values[:, :c]
    density = (-(dn ** 2).mean(-1)).exp()
    i = torch.arange(n)
    mask = ((density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (i[None, :] < i[:, None]))).float()
    parent = (dist * mask + dist.max() * (1 - mask)).min(-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:c]
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(c)
    return torch.stack([x[assign == j].sum(0) / ((assign == j).sum() + 1e-6) for j in range(c)])


def reference(ref, spec, emb, vis, query):
    """Official algorithm of ``spec`` on one sample: emb (1, N, d) LLM input, vis (N,) bool vision
    positions, ``query`` the index of the last prompt token. Returns (logits (N, vocab) at the
    positions still present at the end, kept sets per decision as (N,) bool over the input)."""
    cfg = parse_method_spec(spec)
    lm = ref.model.language_model
    N = emb.shape[1]
    seq = list(range(N))  # the positions still in the sequence, in order
    h = {p: emb[0, p] for p in seq}
    pos = {p: p for p in seq}  # RoPE position of each token present
    V0 = int(vis.sum())
    vis_now = [p for p in seq if vis[p]]
    decisions, raters = [], None
    renumber = cfg.renumbers

    def cut(keep_vis, new_tokens=()):
        nonlocal seq, vis_now
        keep = set(keep_vis)
        new_seq = []
        for p in seq:
            if isinstance(p, tuple) or vis[p]:
                if p in keep:
                    new_seq.append(p)
            else:
                new_seq.append(p)
        if new_tokens:  # SparseVLM: recycled tokens right after the kept vision tokens
            last_vis = max(i for i, p in enumerate(new_seq) if p in keep) if keep else [i for i, p in enumerate(new_seq) if not vis[p]][0] - 1
            ids = []
            for j, t in enumerate(new_tokens):
                key = ("merged", len(decisions), j)
                h[key] = t
                ids.append(key)
            new_seq = new_seq[: last_vis + 1] + ids + new_seq[last_vis + 1:]
        seq = new_seq
        vis_now = [p for p in seq if (isinstance(p, tuple) or vis[p])]
        mark = torch.zeros(N, dtype=torch.bool)
        for p in keep_vis:
            if not isinstance(p, tuple):
                mark[p] = True
        decisions.append(mark)
        if renumber:
            for i, p in enumerate(seq):
                pos[p] = i
        for p in seq:
            pos.setdefault(p, None)

    def x_now():
        return torch.stack([h[p] for p in seq])[None]

    def p_now():
        return torch.tensor([[pos[p] for p in seq]])

    def last_row(rows):  # (H, n, n) -> the query row averaged over heads, at the vision tokens present
        qi = seq.index(query)
        r = rows.float().mean(0)[qi]
        return {p: float(r[i]) for i, p in enumerate(seq) if p in vis_now}

    def top(scores, k):  # highest first, ties by position
        order = sorted(scores, key=lambda p: (-scores[p], seq.index(p)))
        return sorted(order[:k], key=seq.index)

    if cfg.name == "sparsevlm":  # text raters from the input embeddings
        first = min(p for p in range(N) if vis[p])
        t_idx = [p for p in range(query + 1) if not vis[p] and p > first]
        v = emb[0, vis]
        t = emb[0, t_idx]
        m = torch.softmax(v @ t.T, dim=1).mean(0)
        raters = [p for p, mm in zip(t_idx, m) if mm > m.mean()]
        steps = dict(zip(cfg.sparse_layers, range(3)))
    for l, layer in enumerate(lm.layers):
        if cfg.name == "pyramiddrop" and l in cfg.boundaries:
            s = cfg.boundaries.index(l) + 1
            x = x_now()
            cos, sin = lm.rotary_emb(x, p_now())
            hn = layer.input_layernorm(x)
            hd = layer.self_attn.head_dim
            q = layer.self_attn.q_proj(hn).view(1, -1, 4, hd).transpose(1, 2)
            k = layer.self_attn.k_proj(hn).view(1, -1, 2, hd).transpose(1, 2)
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = repeat_kv(k, 2)
            qi = seq.index(query)
            att = torch.softmax((q[:, :, qi:qi + 1] @ k.transpose(2, 3)) / hd ** 0.5, -1)[0, :, 0]  # (H, n)
            r = att.mean(0)
            scores = {p: float(r[i]) for i, p in enumerate(seq) if p in vis_now}
            cut(top(scores, int(V0 * cfg.lam ** s)))
        if cfg.name == "random_llm" and l == cfg.k:
            mask = cfg.subset(V0, int(round(V0 * cfg.keep)))
            cut([p for p, m in zip(vis_now, mask) if m])
        x = x_now()
        decide_here = (cfg.name == "fastv" and l == cfg.k - 1) or (cfg.name == "sparsevlm" and l in steps)
        rows = _eager_rows(layer, x, p_now(), lm.rotary_emb) if decide_here else None
        cos, sin = lm.rotary_emb(x, p_now())
        n = x.shape[1]
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=p_now())[0]
        for i, p in enumerate(seq):
            h[p] = out[i]
        if cfg.name == "fastv" and l == cfg.k - 1:
            cut(top(last_row(rows), int(round(V0 * cfg.keep))))
        if cfg.name == "sparsevlm" and l in steps:
            k_, rec, c = cfg.steps(V0)[steps[l]]
            rr = rows.float().mean(0)
            rel = {p: float(sum(rr[seq.index(t), i] for t in raters) / len(raters)) for i, p in enumerate(seq) if p in vis_now}
            kept = top(rel, k_)
            pruned = {p: rel[p] for p in vis_now if p not in kept}
            recycled = sorted(pruned, key=lambda p: (-pruned[p], seq.index(p)))[:rec]
            merged = _official_cluster(torch.stack([h[p] for p in recycled]), c) if rec else []
            # the kept set the implementation records: the first len(kept)+c vision slots of the input
            vis_slots = [p for p in range(N) if vis[p]]
            cut_kept = kept
            cut(cut_kept, list(merged))
            decisions[-1] = torch.zeros(N, dtype=torch.bool)
            decisions[-1][vis_slots[: len(kept) + len(merged)]] = True
            decisions[-1] = (decisions[-1], set(kept))
    x = x_now()
    logits = ref.lm_head(lm.norm(x))[0]
    return {p: logits[i] for i, p in enumerate(seq) if not isinstance(p, tuple)}, decisions


def _llm_input(model, inputs, layer=0):
    """The input of decoder layer ``layer`` (0: the LLM input embeddings) and the vision mask, vanilla forward (one sample)."""
    got = {}
    layer0 = model.model.language_model.layers[layer]
    def grab(m, a, kw):
        got.setdefault("x", (a[0] if a else kw["hidden_states"]).detach())

    hook = layer0.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return got["x"], inputs["input_ids"][0] == model.config.image_token_id


def _generate(model, inputs, steps=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)


# ------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("spec", SPECS)
def test_matches_official_reference_prefill_and_cached_decode(models, tiny_processor, recorded, spec):
    model, ref = models
    inputs = make_inputs(tiny_processor, sizes=[SIZES[1]], questions=[QUESTIONS[1]])
    N = inputs["input_ids"].shape[1]
    emb, vis = _llm_input(apply_method(model, None), inputs)
    apply_method(model, spec)
    out = _generate(model, inputs, steps=3)
    assert isinstance(output_cache(out), type(output_cache(out))) and out.sequences.shape[1] == N + 3
    decided = [r[0] for r in recorded]
    new = out.sequences[0, N:]
    with torch.no_grad():
        full = torch.cat([emb, ref.get_input_embeddings()(new[None])], 1)
        vis_full = torch.cat([vis, torch.zeros(len(new), dtype=torch.bool)])
        logits, ref_dec = reference(ref, spec, full, vis_full, query=N - 1)
    assert len(decided) == len(ref_dec) > 0
    for mine, theirs in zip(decided, ref_dec):  # the selected indices, decision by decision
        want = theirs[0] if isinstance(theirs, tuple) else theirs
        assert torch.equal(mine[:N], want[:N]), spec
    # prefill logits (the last prompt token) and every cached decode step == the reference's full recompute
    for t, step in enumerate(out.logits):
        assert (step[0] - logits[N - 1 + t]).abs().max() < 1e-4, (spec, t)
    apply_method(model, None)


def test_fastv_row_equals_hf_eager_attention_and_crafted_ties(models, tiny_processor, recorded):
    model, _ = models
    inputs = make_inputs(tiny_processor, sizes=[SIZES[0]], questions=[QUESTIONS[0]])
    vis = inputs["input_ids"][0] == model.config.image_token_id
    V = int(vis.sum())
    # crafted: layer k-1's queries are zero -> every key gets the same attention -> ties -> the first tokens
    apply_method(model, "fastv:k=3,keep=0.25")
    q = model.model.language_model.layers[2].self_attn.q_proj
    saved = (q.weight.detach().clone(), None if q.bias is None else q.bias.detach().clone())
    with torch.no_grad():
        q.weight.zero_()
        model(**inputs)
        q.weight.copy_(saved[0])
    kept = recorded[-1][0][vis]
    n = round(V * 0.25)
    assert kept[:n].all() and not kept[n:].any()
    # the recomputed row equals HF's eager output_attentions of that layer
    from pmod_bench.model.layer import query_attention

    apply_method(model, None)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            eager = model(**inputs, output_attentions=True).attentions[1][0].mean(0)[-1]  # layer 1, last token
        layer = model.model.language_model.layers[1]
        x, _ = _llm_input(model, inputs, layer=1)
        with torch.no_grad():
            pos = torch.arange(x.shape[1])[None]
            cos, sin = model.model.language_model.rotary_emb(x, pos)
            hn = layer.input_layernorm(x)
            row = query_attention(layer.self_attn, layer.self_attn.q_proj(hn), layer.self_attn.k_proj(hn), (cos, sin), None, None,
                                  x.shape[1], torch.tensor([[x.shape[1] - 1]]), torch.ones(1, 1), None, None)
        assert torch.allclose(row[0], eager.float(), atol=1e-6)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("spec", SPECS)
def test_batched_equals_single_and_cache_holds_kept_only(models, tiny_processor, spec):
    model, _ = models
    apply_method(model, spec)
    try:
        batch = make_inputs(tiny_processor, sizes=SIZES, questions=QUESTIONS)
        n = batch["input_ids"].shape[1]
        together = _generate(model, batch, steps=3)
        cache = output_cache(together)
        L = len(model.model.language_model.layers)
        cfg = parse_method_spec(spec)
        for i in range(len(SIZES)):
            single = make_inputs(tiny_processor, sizes=[SIZES[i]], questions=[QUESTIONS[i]])
            alone = _generate(model, single, steps=3)
            assert together.sequences[i, n:].tolist() == alone.sequences[0, single["input_ids"].shape[1]:].tolist()
            for a, b in zip(together.logits, alone.logits):
                assert (a[i] - b[0]).abs().max() < 1e-4, (spec, i)
            # KV entries: text + kept vision per layer (the analytic count), after prefill + 3 decode steps
            V = int((single["input_ids"][0] == model.config.image_token_id).sum())
            T = single["input_ids"].shape[1] - V
            want = [T + v + 2 for v in cfg.layer_vision_tokens(L, V)]  # 3 steps: 2 decoded tokens are cached
            layers = output_cache(alone).layers
            got = [int(l.valid.sum()) if isinstance(l, PMoDCacheLayer) and l.valid is not None else l.keys.shape[-2] for l in layers]
            assert got == want, (spec, got, want)
        assert all(isinstance(cache.layers[j], PMoDCacheLayer) for j in range(cfg.first_layer(), L))
    finally:
        apply_method(model, None)


def test_on_pmod_model_and_no_host_sync(tiny_vanilla, tiny_processor, one_thread):
    from test_core_contract import syncs_inside

    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import random_routers

    model = to_pmod(tiny_vanilla, PMoDConfig(shift=0.5))
    random_routers(model, seed=2)
    routed = set(model.pmod_layers)
    apply_method(model, "fastv:k=2,keep=0.5")
    assert set(model.pmod_layers) == routed  # method-only layers are not p-MoD layers
    batch = make_inputs(tiny_processor, sizes=SIZES, questions=QUESTIONS)
    with torch.no_grad(), syncs_inside(model.model.language_model.layers[1:]) as mode:
        model(**batch, use_cache=True)
    assert mode.count == 0
    out = _generate(model, make_inputs(tiny_processor, sizes=[SIZES[0]], questions=[QUESTIONS[0]]), steps=2)
    assert out.sequences.shape[1] > 0
    apply_method(model, None)
    assert set(model.pmod_layers) == routed and type(model).__name__.startswith("PMoD")


def test_spec_errors_name_the_fix(models):
    model, _ = models
    with pytest.raises(MethodError, match=r"k must be in \[1, 7\]"):
        apply_method(model, "fastv:k=8")
    with pytest.raises(MethodError, match="must be in"):
        parse_method_spec("fastv:keep=1.5")
    with pytest.raises(MethodError, match="beyond the LLM"):
        apply_method(model, "pyramiddrop")  # official 8-16-24 on an 8-layer LLM
    with pytest.raises(MethodError, match="increasing"):
        parse_method_spec("pyramiddrop:layers=8-4")
    with pytest.raises(MethodError, match="one of 192, 128, 96, 64"):
        parse_method_spec("sparsevlm:retain=100")
    assert parse_method_spec("fastv").to_dict() == {"method": "fastv", "k": 2, "keep": 0.5}
    assert parse_method_spec("pyramiddrop").budget() == {"layers": "8-16-24", "lam": 0.5}
    assert SCHEDULES[192] == (300, 200, 110)


def test_equal_compute_solver_matches_pmod_05():
    from pmod_bench.methods import solve
    from pmod_bench.methods.accounting import method_flops
    from pmod_bench.profiler.arch import load_arch

    arch = load_arch("llava-next-7b")
    for spec in ("fastv", "pyramiddrop", "random_llm", "sparsevlm"):
        res = solve(spec, arch, (672, 672), match="p-MoD-0.5")
        assert res.rel_err < 0.01, (spec, res.rel_err)
    f = method_flops(parse_method_spec("fastv:k=2,keep=0.5"), arch, (672, 672), 58)
    V = f.baseline_vision_tokens
    assert f.layer_vision_tokens == tuple([V, V] + [round(V * 0.5)] * 30)
    assert f.llm_extra == 2 * (58 + V) * 4096  # the last token's row at layer 1 (q_dim 4096), inside llm_prefill
    plain = method_flops(parse_method_spec("fastv:k=2,keep=0.5"), arch, (672, 672), 58).llm_prefill - f.llm_extra
    from pmod_bench.profiler.flops import llm_prefill_flops

    assert plain == llm_prefill_flops(arch.text, 58, V, list(f.layer_vision_tokens), (), 1).total("full")
    assert abs(f.kv_ratio - (2 * V + 30 * round(V * 0.5)) / (32 * V)) < 1e-12
