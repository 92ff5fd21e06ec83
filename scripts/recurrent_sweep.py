"""Variants of the copy tasks' recurrent DNI side by side in one process (one stacked group of runs): how the
settings of docs/recurrent.md were chosen. Each ``--runs`` entry is ``method[:sg_scale[:bootstrap[:seed[:forget_bias]]]]``;
``oracle`` as the method is DNI handed the true dropped gradient (looked ahead by full BPTT) instead of M: the
ceiling of a perfect SG. Method suffixes: ``+cal`` calibrates the run's SG (the library's default since 2026-12-04;
without it a run here uses the paper's M, so that old sweeps read the same), ``+rls`` fits it by least squares.
Prints, per run, the curriculum length, its error, the SG loss, the calibration gain and the SG alignment.

    python scripts/recurrent_sweep.py --runs bptt dni:1:1 dni:0.1:1 dni:0.1:0.1 oracle -T 3 --steps 12000
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from fastdni.data.copy_streams import CopyStreams, StreamCurriculum
from fastdni.experiments.recurrent_runs import RunGroup, dropped_gradient, masked_bce


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("-T", "--truncation", type=int, default=3)
    p.add_argument("--steps", type=int, default=12000)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sg-lr", type=float, default=1e-2)
    p.add_argument("--sg-lambda", type=float, default=0.0,
                   help="lambda of the SG's two-window targets (RunGroup's sg_lambda; 0: one window, the paper's)")
    p.add_argument("--sg-hidden", type=int, default=0, help="0: a linear SG; N: one ReLU hidden layer of N units")
    p.add_argument("--aux-weight", type=float, default=0.1)
    p.add_argument("--aux-in-target", action="store_true",
                   help="keep the aux loss's gradient in M's regression target (before 2026-12-04: it diverged)")
    p.add_argument("--forget-bias", type=float, default=0.0,
                   help="added to every run's initial forget-gate bias (a run's 5th --runs field overrides it)")
    p.add_argument("--rls-decay", type=float, default=0.999, help="method suffix +rls: the SG's least-squares forgetting")
    p.add_argument("--rls-ridge", type=float, default=1e-3, help="method suffix +rls: ridge, relative to the mean diagonal")
    p.add_argument("--calibration-decay", type=float, default=0.99, help="method suffix +cal: running-mean decay")
    p.add_argument("--max-repeats", type=int, default=0, help="0: copy; R >= 1: repeat copy")
    p.add_argument("--error-unit", choices=("bit", "step"), default="bit")
    p.add_argument("--stream", action="store_true", help="continuous stream (default: episodes reset the state)")
    p.add_argument("--sg-warmup", type=int, default=0,
                   help="ramp every run's sg_scale linearly from 0 over this many windows (default 0: none)")
    p.add_argument("--ptb", action="store_true", help="character-level PTB instead (validation BPC on 50k characters)")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.ptb:
        return sweep_ptb(a)
    methods, sg_scale, bootstrap, seeds, forget = _specs(a)
    calibrate = ["+cal" in m for m in methods]
    methods = [m.replace("+cal", "") for m in methods]
    solvers = ["rls" if m.endswith("+rls") else "adam" for m in methods]
    methods = [m.removesuffix("+rls") for m in methods]
    oracle = torch.tensor([m == "oracle" for m in methods])
    methods = ["dni" if m == "oracle" else m for m in methods]
    streams = CopyStreams(len(methods), a.batch_size, max_repeats=a.max_repeats, seed=100)
    group = RunGroup(methods, seeds, streams.input_channels, a.hidden, streams.output_channels, sg_scale=sg_scale,
                     aux_weight=a.aux_weight, aux_in_target=a.aux_in_target, bootstrap=bootstrap, forget_bias=forget,
                     sg_solver=solvers, sg_hidden=a.sg_hidden, sg_lambda=a.sg_lambda, rls_decay=a.rls_decay,
                     rls_ridge=a.rls_ridge, calibrate=calibrate, calibration_decay=a.calibration_decay)
    optimizers = [torch.optim.Adam(group.core_parameters(), lr=a.lr), torch.optim.Adam(group.sg_parameters(), lr=a.sg_lr)]
    curriculum = StreamCurriculum(len(methods), a.batch_size, streams.output_channels, per=a.error_unit)
    state, sg_loss, cosines, began = group.initial_state(a.batch_size), torch.zeros(len(methods)), [], time.time()
    sg_norm = torch.full((len(methods),), 1e-30)

    def future_loss(future):
        def loss(s):
            logits, _, _ = group(future.inputs, s, None if a.stream else future.starts)
            return masked_bce(logits, future.targets, future.mask)
        return loss

    def horizon() -> int:
        return int(streams.episode_steps(curriculum.lengths.max(), torch.tensor(max(a.max_repeats, 1)))) + 1

    base_scales = list(group.sg_scales)
    for step in range(1, a.steps + 1):
        if a.sg_warmup:
            group.sg_scales = [x * min(1.0, step / a.sg_warmup) for x in base_scales]
        w = streams.window(a.truncation)
        resets = None if a.stream else w.starts
        oracle_end = None  # [R, B, 2H]: the oracles' true gradient beyond the window, the others' own M / B
        if bool(oracle.any()):
            with torch.no_grad():
                _, _, end = group(w.inputs, state, resets)
            true_end = dropped_gradient(end, future_loss(streams.fork().window(horizon())))
            with torch.no_grad():
                own = group.predict(torch.cat(end, -1)) / a.batch_size
            oracle_end = torch.where(oracle[:, None, None], true_end, own)
        logits, state, stats = group.train_window(w.inputs, lambda lg: masked_bce(lg, w.targets, w.mask), state,
                                                  resets=resets, oracle=oracle_end)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            bits = F.binary_cross_entropy_with_logits(logits, w.targets, reduction="none").sum(-1) / math.log(2)
            if curriculum.update(bits, w.current):
                streams.set_lengths(curriculum.lengths)
        sg_loss = 0.99 * sg_loss + 0.01 * stats.sg_loss
        sg_norm = 0.99 * sg_norm + 0.01 * stats.sg_target_norm
        if step % 100 == 0:  # the alignment, averaged over many boundaries: one boundary is a noisy estimate
            cosines.append(group.alignment(state, future_loss(streams.fork().window(horizon())))[0])
        if step % a.every == 0:
            cos = torch.stack(cosines).nanmean(0) if cosines else torch.full((len(methods),), float("nan"))
            cosines.clear()
            print(f"{step} {time.time() - began:.0f}s length {curriculum.lengths.tolist()} "
                  f"err {[f'{e:.2f}' for e in curriculum.last_error.tolist()]} "
                  f"sg_loss/target {[f'{x:.2f}' for x in (sg_loss / sg_norm).tolist()]} "
                  f"gain {[f'{x:.2f}' for x in group.sg_gain().tolist()]} cos {[f'{x:.2f}' for x in cos.tolist()]}",
                  flush=True)
    print("max length reached", curriculum.max_length_reached.tolist(), f"{time.time() - began:.0f}s")


def _specs(a):
    specs = [r.split(":") for r in a.runs]
    return ([s[0] for s in specs], [float(s[1]) if len(s) > 1 else 1.0 for s in specs],
            [float(s[2]) if len(s) > 2 else 1.0 for s in specs], [int(s[3]) if len(s) > 3 else 0 for s in specs],
            [float(s[4]) if len(s) > 4 else a.forget_bias for s in specs])


def sweep_ptb(a) -> None:
    from fastdni.data import load_ptb_chars
    from fastdni.experiments.recurrent import _ce_per_run, _one_hot, batchify, evaluate_bpc

    data = load_ptb_chars(None)
    vocab = len(data.vocab)
    methods, sg_scale, bootstrap, seeds, forget = _specs(a)
    group = RunGroup(methods, seeds, vocab, a.hidden, vocab, sg_scale=sg_scale, aux_weight=a.aux_weight,
                     aux_in_target=a.aux_in_target, bootstrap=bootstrap, forget_bias=forget)
    optimizers = [torch.optim.Adam(group.core_parameters(), lr=a.lr), torch.optim.Adam(group.sg_parameters(), lr=a.sg_lr)]
    text = batchify(data.train, a.batch_size)
    state, position, began, sg_loss = group.initial_state(a.batch_size), 0, time.time(), torch.zeros(len(methods))
    for step in range(1, a.steps + 1):
        x, y = text[position : position + a.truncation], text[position + 1 : position + a.truncation + 1]
        _, state, stats = group.train_window(_one_hot(x, vocab, len(methods)), lambda lg: _ce_per_run(lg, y), state)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        position += a.truncation
        sg_loss = 0.99 * sg_loss + 0.01 * stats.sg_loss
        if step % a.every == 0:
            valid = evaluate_bpc(group, data.valid, vocab, max_chars=50_000)
            print(f"{step} {time.time() - began:.0f}s valid_bpc {[f'{v:.3f}' for v in valid.tolist()]} "
                  f"sg_loss {[f'{x:.2g}' for x in sg_loss.tolist()]}", flush=True)


if __name__ == "__main__":
    main()
