"""`ctxext finetune`: a short long-context fine-tune (full or LoRA, optionally PoSE) on Accelerate.

Scaling the rotary frequencies gets a model most of the way to a longer context; a few hundred
steps at the new length close the rest (YaRN: 400 steps, lr 2e-5, AdamW betas (0.9, 0.95), 20
warm-up steps). This package runs that step and always writes a plain, merged Hugging Face
checkpoint whose config.json is exactly what `ctxext extend` writes. Its options are
:class:`ctxext.config.FinetuneConfig`.

Modules, in the order a run uses them:

- :mod:`~ctxext.finetune.setup`: what the run will do, checked before anything is loaded;
- :mod:`~ctxext.finetune.data`: documents packed into chunks, PoSE position ids, samples;
- :mod:`~ctxext.finetune.model`: the model made trainable (all weights or LoRA);
- :mod:`~ctxext.finetune.optim`: AdamW (decay on matrices only) and the lr schedule;
- :mod:`~ctxext.finetune.parallel`: Accelerate, FSDP2 and context-parallel setup;
- :mod:`~ctxext.finetune.loop`: :func:`~ctxext.finetune.loop.run_finetune`, the step loop;
- :mod:`~ctxext.finetune.state`: the work folder, log and resumable checkpoints;
- :mod:`~ctxext.finetune.export`: the merged checkpoint written atomically.

Files of a run writing OUT::

    OUT.ctxext-work/                  while training (a sibling of OUT, removed on success)
        run.json                      what the run is; --resume refuses a different run
        log.jsonl                     one line per optimizer step
        checkpoints/step-000050/      accelerator.save_state (model, optimizer, scheduler, RNG)
                                      + trainer_state.json (step, data position, tokens, time)
    OUT/                              appears in one rename once training is done: the merged
                                      model, tokenizer, training_log.jsonl, loss.png, provenance

Checkpoints are written into ``checkpoints/.tmp-step-N`` and renamed when complete, so a
hard kill leaves either a complete checkpoint or a temporary folder that resuming ignores.

Determinism: sample number i of the run (0, 1, 2, ... over all optimizer steps) is a fixed
chunk of packed text (a per-epoch permutation seeded by ``seed``) and, with PoSE, fixed position
ids (a generator seeded by ``seed`` and i). Optimizer step s consumes samples
[s*G, (s+1)*G) with G = batch_size x processes x grad_accum, however they are split between
processes and accumulation steps: a 2-process run and a 1-process run with the same G see the
same data, and a resumed run continues from sample step*G.

No module of this package imports torch at import time (the CLI's ``--help`` stays instant).
"""
