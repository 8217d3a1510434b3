"""Runs the quality benchmark: trains each (method, protocol, seed), evaluates it, and reports progress by epoch.

:func:`run_job` is one run, in one process; :func:`run_tasks` spreads runs over worker processes (one
torch thread each by default, so that processes and threads never outnumber the cores) and shows one
progress bar over every epoch of every run; :func:`run_all` runs every job of the settings.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import queue
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.augment import ImageAugment, SignalAugment
from benchmarks.datasets import DataSet, ProtocolData, load, plant_duplicates, protocol_data
from benchmarks.encoders import DigitCNN, ResNet18, SignalCNN
from benchmarks.methods import MemoryBankMethod, build_method, views_of
from benchmarks.quality_settings import Settings, workers_for
from ssl_memory import MultiAugCollate, WithIndex
from ssl_memory.evaluation import knn_accuracy
from ssl_memory.retrieval import retrieval_metrics

Job = tuple[str, str, int]  # (method, protocol, seed)
# Samples whose views' agreement is measured at the end (the first ones of the training split).
KL_SAMPLES = 2000


def headline(protocol: str) -> str:
    """The metric each protocol is judged by."""
    return "knn" if protocol == "seen" else "recall@1"


def load_data(settings: Settings) -> DataSet:
    return load(settings.dataset, settings.data_root or None)


def make_encoder(settings: Settings, data: DataSet) -> nn.Module:
    dim = settings.method.dim
    if data.kind == "signal":
        return SignalCNN(dim, settings.width, settings.head)
    if data.train.x.shape[1] == 1:  # grey digits: mnist5k, clutter5k
        return DigitCNN(dim, settings.width, settings.stem_stride)
    return ResNet18(dim, data.train.x.shape[1])


def make_augment(data: DataSet, settings: Settings, generator: torch.Generator) -> nn.Module:
    if data.kind == "signal":
        return SignalAugment(generator=generator)
    digits = data.train.x.shape[1] == 1  # a flipped digit is another symbol
    return ImageAugment(area=(settings.crop_min, 1.0), flip=0.0 if digits else 0.5, generator=generator)


@torch.no_grad()
def embed(encoder: nn.Module | None, x: torch.Tensor, settings: Settings, features: str, batch: int = 1024):
    """Unit-norm evaluation features: the encoder's backbone or output, or the flattened input without encoder."""
    if encoder is None:
        return F.normalize(x.flatten(1).float(), dim=1)
    was_training = encoder.training
    encoder.eval()
    fn = encoder.backbone if features == "backbone" else encoder
    out = torch.cat([fn(x[i : i + batch].to(settings.device)).float().cpu() for i in range(0, len(x), batch)])
    encoder.train(was_training)
    return F.normalize(out, dim=1)


def evaluate(encoder: nn.Module | None, data: ProtocolData, settings: Settings, final: bool) -> dict[str, float]:
    """Seen: weighted kNN and 1-NN accuracy. Unseen: Recall@K (and MAP@R, precision@1 when ``final``)."""
    out: dict[str, float] = {}
    kinds = ("backbone", "embedding") if settings.features == "both" else (settings.features,)
    for kind in kinds if encoder is not None else ("input",):
        prefix = "emb_" if kind == "embedding" and len(kinds) == 2 else ""
        query = embed(encoder, data.query.x, settings, kind)
        if data.protocol == "seen":
            gallery = embed(encoder, data.gallery.x, settings, kind)
            args = (query, data.query.y, gallery, data.gallery.y)
            out[prefix + "knn"] = knn_accuracy(*args, k=settings.knn_k, temperature=settings.knn_temperature)
            if final:
                out[prefix + "1nn"] = knn_accuracy(*args, k=1)
                for k in settings.extra_knn_k:
                    out[f"{prefix}knn@{k}"] = knn_accuracy(*args, k=k, temperature=settings.knn_temperature)
        else:
            out.update({prefix + k: v for k, v in retrieval_metrics(query, data.query.y, map_at_r=final).items()})
    return out


def _loader(data: ProtocolData, views: int, settings: Settings, generator: torch.Generator) -> DataLoader:
    x = data.train.x
    return DataLoader(
        WithIndex(TensorDataset(x, data.train.y)),
        batch_size=settings.batch_size,
        shuffle=True,
        # BatchNorm cannot train on one sample (MoCo encodes queries and keys apart); otherwise every sample
        # is seen, and written to the bank, once an epoch, which is how the merger counts epochs
        drop_last=len(x) % settings.batch_size == 1,
        generator=generator,
        collate_fn=MultiAugCollate(nn.Identity(), views=views),  # augmentation runs on the whole batch
    )


def run_job(
    settings: Settings,
    job: Job,
    data: DataSet,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_round: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, Any]:
    """Train ``job``'s method with its seed on its protocol's training data; return its history and final metrics.

    ``on_epoch`` gets ``{"job", "epoch", "loss"}`` after each epoch (for a progress bar); ``on_round``
    goes to the memory-bank methods (see :func:`~benchmarks.methods.build_method`).
    """
    method, protocol, seed = job
    split = protocol_data(data, protocol)
    record: dict[str, Any] = {"method": method, "protocol": protocol, "seed": seed, "history": [], "seconds": 0.0}
    planted = None
    if settings.plant_duplicates > 0 and method not in ("raw", "random"):
        # Copies join the training data only; the seen protocol's gallery stays the original train split.
        train, planted = plant_duplicates(split.train, settings.plant_duplicates, data.kind, seed=seed)
        split = dataclasses.replace(split, train=train)
        record["planted_pairs"] = len(planted)
    if method == "raw":
        record["final"] = evaluate(None, split, settings, final=True)
        return record
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    encoder = make_encoder(settings, data).to(settings.device)
    if method == "random":
        record["final"] = evaluate(encoder, split, settings, final=True)
        return record

    views = views_of(method, settings.method)
    loader = _loader(split, views, settings, generator)
    steps = len(loader)
    model = build_method(
        method,
        encoder,
        split.train.y,
        steps,
        settings.method,
        generator,
        inputs=split.train.x,
        planted=planted,
        on_round=on_round,
    ).to(settings.device)
    augment = make_augment(data, settings, generator)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, settings.lr, total_steps=settings.epochs * steps, pct_start=settings.lr_warmup
    )
    seconds = cpu = 0.0
    for epoch in range(settings.epochs):
        start, start_cpu = time.perf_counter(), time.process_time()
        model.on_epoch_start(epoch)
        total = torch.zeros((), device=settings.device)  # summed on the device: no sync each step
        for batch in loader:
            inputs = augment(batch["views"]).to(settings.device)
            loss = model.loss(inputs, batch["indices"].to(settings.device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.detach()
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        mean_loss = float(total) / steps
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{method} (seed {seed}, {protocol}) diverged at epoch {epoch + 1}")
        last = epoch + 1 == settings.epochs
        entry = {"epoch": epoch + 1, "loss": mean_loss, **model.log()}
        if last or (epoch + 1) % settings.eval_every == 0:
            entry.update(evaluate(encoder, split, settings, final=last))
        record["history"].append(entry)
        if on_epoch is not None:
            on_epoch({"job": job, "epoch": epoch + 1, "loss": mean_loss})
    record["seconds"], record["cpu_seconds"] = seconds, cpu
    record["final"] = {k: v for k, v in record["history"][-1].items() if k not in ("epoch", "loss")}
    if isinstance(model, MemoryBankMethod):
        record["merges"] = model.merges
        record["final"]["views_kl"] = model.views_kl(split.train.x[:KL_SAMPLES], augment)
    return record


def jobs_of(settings: Settings) -> list[Job]:
    """Every (method, protocol, seed) to run; the raw input does not depend on the seed."""
    jobs = [(m, p, s) for p in settings.protocols for m in settings.methods for s in settings.seeds]
    return [j for j in jobs if not (j[0] == "raw" and j[2] != settings.seeds[0])]


def plan(settings: Settings, out: Any) -> str:
    """What is about to run, in one sentence."""
    jobs = jobs_of(settings)
    workers = workers_for(settings, len(jobs))
    seeds = f"{len(settings.seeds)} seed{'s' if len(settings.seeds) > 1 else ''}"
    if settings.plant_duplicates > 0:
        seeds += f", {100 * settings.plant_duplicates:.0f}% of the training samples given a planted near-copy"
    return (
        f"Training {', '.join(m for m in settings.methods if m not in ('raw', 'random'))} on {settings.dataset} "
        f"({' and '.join(settings.protocols)} classes), {seeds}, {settings.epochs} epochs each, in {workers} "
        f"process{'es' if workers > 1 else ''} of {settings.threads or 'default'} thread(s); outputs go to {out}/."
    )


def _cost(settings: Settings, job: Job) -> float:
    method, protocol, _ = job
    if method in ("raw", "random"):
        return 0.0
    return views_of(method, settings.method) * (1.6 if protocol == "seen" else 1.0)  # seen trains on 8/5 the samples


# What a worker process holds: set once by _start_worker, read by _pool_job.
_WORKER: dict[str, Any] = {}


def _start_worker(threads: int, data: DataSet, events: Any) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(threads)
    _WORKER.update(data=data, events=events)


def _pool_job(settings: Settings, job: Job) -> dict[str, Any]:
    return run_job(settings, job, _WORKER["data"], _WORKER["events"].put)


def run_all(settings: Settings, progress: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every job of ``settings``, longest first; ``log`` gets a line as each run finishes."""
    jobs = jobs_of(settings)
    runs = run_tasks([(settings, job) for job in jobs], load_data(settings), settings.threads, progress, log)
    order = {m: i for i, m in enumerate(settings.methods)}
    return sorted(runs, key=lambda r: (r["protocol"], order[r["method"]], r["seed"]))


def run_tasks(
    tasks: list[tuple[Settings, Job]],
    data: DataSet,
    threads: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    label: Callable[[Settings, Job], str] | None = None,
) -> list[dict[str, Any]]:
    """Run each (settings, job) on ``data``, longest first, in ``workers_for`` processes; records in ``tasks``' order.

    ``log`` gets a line as each run finishes, headed by ``label(settings, job)`` (default: the job).
    """
    from tqdm import tqdm

    order = sorted(range(len(tasks)), key=lambda i: -_cost(*tasks[i]) * tasks[i][0].epochs)  # balances the workers
    epochs = sum(s.epochs for s, (m, _, _) in tasks if m not in ("raw", "random"))
    bar = tqdm(total=epochs, desc="training", unit="epoch", disable=not progress, dynamic_ncols=True)
    write = tqdm.write if progress else log
    label = label or (lambda s, job: f"{job[0]:>12} {job[1]:>6} seed {job[2]}")

    def on_epoch(event: dict[str, Any]) -> None:
        bar.update()
        method, protocol, seed = event["job"]
        bar.set_postfix_str(f"{method}, {protocol}, seed {seed}: epoch {event['epoch']}, loss {event['loss']:.3f}")

    runs: list[dict[str, Any]] = [{}] * len(tasks)

    def finished(i: int, record: dict[str, Any]) -> None:
        runs[i] = record
        metric = headline(record["protocol"])
        write(f"{label(*tasks[i])}: {metric} {record['final'][metric]:.3f}  ({record['seconds']:.0f} s of training)")

    workers = max((workers_for(s, len(tasks)) for s, _ in tasks), default=1)
    if workers == 1:
        if threads > 0:
            torch.set_num_threads(threads)
        for i in order:
            finished(i, run_job(*tasks[i], data, on_epoch))
    else:
        # spawn, not fork: a forked child of a process that already ran OpenMP code can deadlock
        context = multiprocessing.get_context("spawn")
        events = context.Queue()
        pool = ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(threads, data, events))
        with pool:
            pending = {pool.submit(_pool_job, *tasks[i]): i for i in order}
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(events, on_epoch)
                for future in done:
                    finished(pending.pop(future), future.result())
            _drain(events, on_epoch)
    bar.close()
    return runs


def _drain(events: Any, on_epoch: Callable[[dict[str, Any]], None]) -> None:
    while True:
        try:
            on_epoch(events.get_nowait())
        except queue.Empty:
            return
