"""The toy world: a deterministic synthetic benchmark family and trained tiny p-MoD checkpoints, so the
whole paper pipeline (train -> lmms-eval -> profile -> report) produces real numbers offline on a CPU.

* :mod:`pmod_bench.toy.world`, :mod:`~pmod_bench.toy.questions`: scenes of coloured shapes and the
  questions about them (POPE-, VQA-, MMBench-, TextVQA-, RefCOCO-like);
* :mod:`~pmod_bench.toy.data`: the benchmark in the hub layout (lmms-eval tasks ``pmod_toy_*``,
  suite ``toy``) and the LLaVA-format training sets;
* :mod:`~pmod_bench.toy.prepare`: the toy tokenizer, language model and CLIP vision tower;
* :mod:`~pmod_bench.toy.models` + ``recipes/``: one `pmod-bench train` recipe per model;
* :mod:`~pmod_bench.toy.pipeline`: ``pmod-bench reproduce --toy`` (resumable);
* :mod:`~pmod_bench.toy.routing`, :mod:`~pmod_bench.toy.report`: the kept-token statistic and the report.

Importing this package is light (no torch).
"""
