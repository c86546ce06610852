"""In-LLM comparison methods (FastV, PyramidDrop, SparseVLM, in-LLM random pruning) on the p-MoD core.

A reference written here recomputes each official algorithm step by step the way the official code
does it (batch of one; dropped tokens really cut out of the sequence; HF's eager attention weights
of the plain HF layers; positions kept or renumbered), on a second copy of the tiny model. It must
match the implementation's kept tokens and logits, for the prefill and for every cached decode step.
"""

from __future__ import annotations

import pytest
import torch

from pmod_bench.methods import MethodError, apply_method, parse_method_spec
from pmod_bench.methods.sparsevlm import SCHEDULES
from pmod_bench.model.cache import PMoDCacheLayer, output_cache

SIZES = [(64, 48), (40, 90), (160, 160)]
QUESTIONS = ["What is shown in the image?", "Is there a red circle? Answer yes or no.", "Count the shapes."]
SPECS = ["fastv:k=2,keep=0.5", "pyramiddrop:layers=2-4-6,lam=0.5", "sparsevlm:layers=2-4-5,retain=192", "random_llm:k=3,keep=0.4",
         "vtw:k=3"]


@pytest.fixture(scope="module")
def models(host):
    """(method model, reference model): two copies of the same tiny vanilla model of each host (eager for the
    reference)."""
    torch.set_num_threads(1)
    return host.build(seed=0), host.build(seed=0, attn_implementation="eager")


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


class OfficialReference:
    """The official algorithm of one spec on one sample, step by step: dropped tokens really cut out of the sequence,
    HF's eager attention weights of the plain HF layers, positions kept or renumbered.

    ``emb`` (1, N, d) LLM input, ``vis`` (N,) bool vision positions, ``query`` the index of the last prompt token,
    ``coords`` (R, N) the original position ids (1-D RoPE: one row ``0..N-1``; M-RoPE: HF's three rows). A token
    present sits in an input *slot* whose coordinates it takes (its own; SparseVLM moves the kept and recycled tokens
    into the first vision slots); renumbering = the slot's coordinates minus the slots left empty before it (1-D:
    its index in the cut sequence, the official ``arange``; M-RoPE: every row shifted alike)."""

    def __init__(self, ref, spec, emb, vis, query, coords=None):
        self.ref, self.cfg, self.vis, self.query = ref, parse_method_spec(spec), vis, query
        self.lm = ref.model.language_model
        self.N = emb.shape[1]
        self.coords = coords if coords is not None else torch.arange(self.N)[None]  # (R, N)
        self.seq = list(range(self.N))  # the tokens still in the sequence, in order
        self.h = {p: emb[0, p] for p in self.seq}
        self.slot = {p: p for p in self.seq}
        self.V0 = int(vis.sum())
        self.vis_now = [p for p in self.seq if vis[p]]
        self.decisions = []

    def is_vis(self, p):
        return isinstance(p, tuple) or bool(self.vis[p])

    def cut(self, keep_vis, new_tokens=(), moved=False):
        keep = set(keep_vis)
        seq = [p for p in self.seq if not self.is_vis(p) or p in keep]
        if new_tokens:  # SparseVLM: recycled tokens right after the kept vision tokens
            last = max(i for i, p in enumerate(seq) if p in keep)
            ids = [("merged", len(self.decisions), j) for j in range(len(new_tokens))]
            self.h.update(zip(ids, new_tokens))
            seq = seq[: last + 1] + ids + seq[last + 1:]
        self.seq = seq
        self.vis_now = [p for p in seq if self.is_vis(p)]
        if moved:  # the vision tokens now fill the first vision slots, in order
            slots = [p for p in range(self.N) if self.vis[p]]
            self.slot.update(zip(self.vis_now, slots))
        mark = torch.zeros(self.N, dtype=torch.bool)
        mark[[p for p in keep_vis if not isinstance(p, tuple)]] = True
        self.decisions.append(mark)

    def x_now(self):
        return torch.stack([self.h[p] for p in self.seq])[None]

    def p_now(self):
        """(R, 1, n) position ids of the tokens present (original, or renumbered)."""
        slots = torch.tensor([self.slot[p] for p in self.seq])
        pos = self.coords[:, slots]
        if self.cfg.renumbers:
            filled = torch.zeros(self.N, dtype=torch.long)
            filled[slots] = 1
            pos = pos - ((1 - filled).cumsum(0) - (1 - filled))[slots]
        return pos[:, None, :] if pos.shape[0] > 1 else pos

    def rope(self, x):
        return self.lm.rotary_emb(x, self.p_now())

    def top(self, scores, k):  # highest first, ties by position
        order = sorted(scores, key=lambda p: (-scores[p], self.seq.index(p)))
        return sorted(order[:k], key=self.seq.index)

    def row_scores(self, rows, weights):
        """{vision token present: sum_r weights[r] * mean_heads rows[r]} from (H, n, n) attention weights."""
        r = rows.float().mean(0)
        return {p: float(sum(w * r[self.seq.index(q), i] for q, w in weights.items()))
                for i, p in enumerate(self.seq) if p in self.vis_now}

    def probe(self, layer):
        """PyramidDrop: the last instruction token's attention row at ``layer`` (in (H, n, n)), from its own norm and
        q/k, before it runs."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        x = self.x_now()
        cos, sin = self.rope(x)
        hn = layer.input_layernorm(x)
        hd = layer.self_attn.head_dim
        q = layer.self_attn.q_proj(hn).view(1, x.shape[1], -1, hd).transpose(1, 2)
        k = layer.self_attn.k_proj(hn).view(1, x.shape[1], -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])
        qi, n = self.seq.index(self.query), x.shape[1]
        rows = torch.zeros(q.shape[1], n, n)  # (H, n, n): only the query's row is computed
        rows[:, qi] = torch.softmax((q[:, :, qi:qi + 1] @ k.transpose(2, 3)) / hd ** 0.5, -1)[0, :, 0]
        return rows

    def layer_step(self, layer, want_rows):
        """Run ``layer`` on the tokens present; its eager attention weights (H, n, n) if asked."""
        x = self.x_now()
        cos, sin = self.rope(x)
        n = x.shape[1]
        mask = torch.full((n, n), torch.finfo(x.dtype).min).triu(1)[None, None]
        rows = None
        if want_rows:
            _, w = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin), attention_mask=mask)
            rows = w[0]
        out = layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=self.p_now()[-1])[0]
        self.h.update(zip(self.seq, out))
        return rows

    def raters(self, emb):
        """SparseVLM's text raters from the input embeddings (uniform weights)."""
        first = min(p for p in range(self.N) if self.vis[p])
        t_idx = [p for p in range(self.query + 1) if not self.vis[p] and p > first]
        m = torch.softmax(emb[0, self.vis] @ emb[0, t_idx].T, dim=1).mean(0)
        chosen = [p for p, mm in zip(t_idx, m) if mm > m.mean()]
        return {p: 1.0 / len(chosen) for p in chosen}

    def sparsevlm_step(self, rows, raters, i):
        k_, rec, c = self.cfg.steps(self.V0)[i]
        rel = self.row_scores(rows, raters)
        kept = self.top(rel, k_)
        pruned = {p: rel[p] for p in self.vis_now if p not in kept}
        recycled = sorted(pruned, key=lambda p: (-pruned[p], self.seq.index(p)))[:rec]
        merged = _official_cluster(torch.stack([self.h[p] for p in recycled]), c) if rec else []
        self.cut(kept, list(merged), moved=True)
        # the kept set the implementation records: the first len(kept)+c vision slots of the input
        mark = torch.zeros(self.N, dtype=torch.bool)
        mark[[p for p in range(self.N) if self.vis[p]][: len(kept) + len(merged)]] = True
        self.decisions[-1] = mark

    def run(self, emb):
        """(logits at the input positions still present at the end, the kept sets per decision (N,) bool)."""
        cfg = self.cfg
        raters = self.raters(emb) if cfg.name == "sparsevlm" else None
        sparse = dict(zip(cfg.sparse_layers, range(3))) if cfg.name == "sparsevlm" else {}
        for l, layer in enumerate(self.lm.layers):
            if cfg.name == "pyramiddrop" and l in cfg.boundaries:
                s = cfg.boundaries.index(l) + 1
                self.cut(self.top(self.row_scores(self.probe(layer), {self.query: 1.0}), int(self.V0 * cfg.lam ** s)))
            if cfg.name == "random_llm" and l == cfg.k:
                mask = cfg.subset(self.V0, int(round(self.V0 * cfg.keep)))
                self.cut([p for p, m in zip(self.vis_now, mask) if m])
            if cfg.name == "vtw" and l == cfg.k:  # the image span cut out before layer k (VTW.py, pe_type "keep")
                self.cut([])
            fastv = cfg.name == "fastv" and l == cfg.k - 1
            rows = self.layer_step(layer, fastv or l in sparse)
            if fastv:
                self.cut(self.top(self.row_scores(rows, {self.query: 1.0}), int(round(self.V0 * cfg.keep))))
            if l in sparse:
                self.sparsevlm_step(rows, raters, sparse[l])
        logits = self.ref.lm_head(self.lm.norm(self.x_now()))[0]
        return {p: logits[i] for i, p in enumerate(self.seq) if not isinstance(p, tuple)}, self.decisions


def reference(ref, spec, emb, vis, query, coords=None):
    """:class:`OfficialReference` of ``spec`` run on one sample."""
    return OfficialReference(ref, spec, emb, vis, query, coords).run(emb)


def _llm_input(model, inputs, layer=0):
    """The input of decoder layer ``layer`` (0: the LLM input embeddings) and the vision mask, vanilla forward (one sample)."""
    from pmod_bench.model.hosts import host_for

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
    return got["x"], host_for(model).vision_mask(model.config, inputs["input_ids"])[0]


def _generate(model, inputs, steps=3):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)


# ------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("spec", SPECS)
def test_matches_official_reference_prefill_and_cached_decode(host, models, recorded, spec):
    model, ref = models
    inputs = host.inputs(sizes=[SIZES[1]], questions=[QUESTIONS[1]])
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
        logits, ref_dec = reference(ref, spec, full, vis_full, query=N - 1, coords=host.coords(ref, inputs, out.sequences))
    assert len(decided) == len(ref_dec) > 0
    for mine, want in zip(decided, ref_dec):  # the selected indices, decision by decision
        assert torch.equal(mine[:N], want[:N]), spec
    # prefill logits (the last prompt token) and every cached decode step == the reference's full recompute
    for t, step in enumerate(out.logits):
        assert (step[0] - logits[N - 1 + t]).abs().max() < 1e-4, (spec, t)
    apply_method(model, None)


def test_fastv_row_equals_hf_eager_attention_and_crafted_ties(host, models, recorded):
    model, _ = models
    inputs = host.inputs(sizes=[SIZES[0]], questions=[QUESTIONS[0]])
    vis = host.vision(model, inputs["input_ids"])[0]
    V = int(vis.sum())
    # crafted: layer k-1's queries are zero -> every key gets the same attention -> ties -> the first tokens
    apply_method(model, "fastv:k=3,keep=0.25")
    q = model.model.language_model.layers[2].self_attn.q_proj
    saved = (q.weight.detach().clone(), None if q.bias is None else q.bias.detach().clone())
    with torch.no_grad():
        for t in (q.weight, q.bias):  # Qwen's projections have biases: zero them too
            if t is not None:
                t.zero_()
        model(**inputs)
        q.weight.copy_(saved[0])
        if q.bias is not None:
            q.bias.copy_(saved[1])
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
            pos = host.coords(model, inputs, inputs["input_ids"])  # (R, N)
            cos, sin = model.model.language_model.rotary_emb(x, pos[:, None] if pos.shape[0] > 1 else pos)
            hn = layer.input_layernorm(x)
            row = query_attention(layer.self_attn, layer.self_attn.q_proj(hn), layer.self_attn.k_proj(hn), (cos, sin), None, None,
                                  x.shape[1], torch.tensor([[x.shape[1] - 1]]), torch.ones(1, 1), None, None)
        assert torch.allclose(row[0], eager.float(), atol=1e-6)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("spec", SPECS)
def test_batched_equals_single_and_cache_holds_kept_only(host, models, spec):
    model, _ = models
    apply_method(model, spec)
    try:
        batch = host.inputs(sizes=SIZES, questions=QUESTIONS)
        n = batch["input_ids"].shape[1]
        together = _generate(model, batch, steps=3)
        cache = output_cache(together)
        L = len(model.model.language_model.layers)
        cfg = parse_method_spec(spec)
        for i in range(len(SIZES)):
            single = host.inputs(sizes=[SIZES[i]], questions=[QUESTIONS[i]])
            alone = _generate(model, single, steps=3)
            assert together.sequences[i, n:].tolist() == alone.sequences[0, single["input_ids"].shape[1]:].tolist()
            for a, b in zip(together.logits, alone.logits):
                assert (a[i] - b[0]).abs().max() < 1e-4, (spec, i)
            # KV entries: text + kept vision per layer (the analytic count), after prefill + 3 decode steps
            V = int(host.vision(model, single["input_ids"])[0].sum())
            T = single["input_ids"].shape[1] - V
            want = [T + v + 2 for v in cfg.layer_vision_tokens(L, V)]  # 3 steps: 2 decoded tokens are cached
            layers = output_cache(alone).layers
            got = [int(l.valid.sum()) if isinstance(l, PMoDCacheLayer) and l.valid is not None else l.keys.shape[-2] for l in layers]
            assert got == want, (spec, got, want)
        assert all(isinstance(cache.layers[j], PMoDCacheLayer) for j in range(cfg.first_layer(), L))
    finally:
        apply_method(model, None)


def test_on_pmod_model_and_no_host_sync(host, host_vanilla, one_thread):
    from test_core_contract import syncs_inside

    from pmod_bench import PMoDConfig
    from pmod_bench.model.modeling import to_pmod
    from pmod_bench.model.presets import random_routers

    model = to_pmod(host_vanilla, PMoDConfig(shift=0.5))
    random_routers(model, seed=2)
    routed = set(model.pmod_layers)
    apply_method(model, "fastv:k=2,keep=0.5")
    assert set(model.pmod_layers) == routed  # method-only layers are not p-MoD layers
    batch = host.inputs(sizes=SIZES, questions=QUESTIONS)
    with torch.no_grad(), syncs_inside(model.model.language_model.layers[1:]) as mode:
        model(**batch, use_cache=True)
    assert mode.count == 0
    out = _generate(model, host.inputs(sizes=[SIZES[0]], questions=[QUESTIONS[0]]), steps=2)
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
    for spec in ("fastv", "pyramiddrop", "random_llm", "sparsevlm", "vtw"):
        res = solve(spec, arch, (672, 672), match="p-MoD-0.5", tolerance=0.05 if spec == "vtw" else 0.01)
        assert res.rel_err < (0.05 if spec == "vtw" else 0.01), (spec, res.rel_err)  # VTW's budget is a layer index
    f = method_flops(parse_method_spec("fastv:k=2,keep=0.5"), arch, (672, 672), 58)
    V = f.baseline_vision_tokens
    assert f.layer_vision_tokens == tuple([V, V] + [round(V * 0.5)] * 30)
    assert f.llm_extra == 2 * (58 + V) * 4096  # the last token's row at layer 1 (q_dim 4096), inside llm_prefill
    plain = method_flops(parse_method_spec("fastv:k=2,keep=0.5"), arch, (672, 672), 58).llm_prefill - f.llm_extra
    from pmod_bench.profiler.flops import llm_prefill_flops

    assert plain == llm_prefill_flops(arch.text, 58, V, list(f.layer_vision_tokens), (), 1).total("full")
    assert abs(f.kv_ratio - (2 * V + 30 * round(V * 0.5)) / (32 * V)) < 1e-12
