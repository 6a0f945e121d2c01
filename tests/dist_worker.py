"""One rank of the distributed tests (test_distributed.py): `python dist_worker.py SPEC.json`, started once per rank
with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

SPEC: {"runs": [{"out", "model", "data", "eval", "opts", "resume"?}], "report": folder,
       "own_group": true (default; one gloo group for all runs) | false (lorart.train starts and ends it),
       "fail": {"rank", "step", "how": "exit" | "hang" | "raise"}?}; a run's "opts_rank1" / "data_rank1": rank 1's
options / data differ; "expect_error": go on with the next run after its error; "copy_from": a folder copied to
"out" first (to resume one of its checkpoints).
Each rank writes report/rank{R}.json: per run, the history it returned, or the error it raised.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import time
import traceback

import torch.distributed as dist

import lorart


def paged_adamw_on_shards() -> dict:
    """PagedAdamW with every state paged (the walk a GPU takes beyond its budget) on a parameter sharded over the
    2 ranks as FSDP2 shards it (Shard(0), 151 + 150 rows), against the same optimizer on the whole parameter:
    the largest differences of the weights and of the gathered state_dict states after 3 steps."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lorart.optim import PagedAdamW

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(0)
    w, g = torch.randn(301, 7, generator=gen), torch.randn(301, 7, generator=gen)
    whole = nn.Parameter(w.clone())
    whole.grad = g.clone()
    shard = nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    shard.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
    opts = []
    for p in (whole, shard):
        opt = PagedAdamW([p], lr=1e-2, weight_decay=0.1, gpu_budget_bytes=0, page_chunk_bytes=4096)
        opt._page_cpu = True
        for _ in range(3):
            opt.step()
        opts.append(opt)
    st_whole, st_shard = (o.state_dict()["state"][0] for o in opts)
    return {"weight": float((shard.full_tensor() - whole).abs().max()),
            "exp_avg": float((st_shard["exp_avg"].full_tensor() - st_whole["exp_avg"]).abs().max()),
            "exp_avg_sq": float((st_shard["exp_avg_sq"].full_tensor() - st_whole["exp_avg_sq"]).abs().max()),
            "paged": bool(opts[1]._pools), "local_rows": shard.to_local().shape[0]}


def held(model) -> dict:
    """{"nf4" | "trainable" | "frozen": [elements this rank holds, elements of the whole tensors]}: FSDP2 keeps 1/N."""
    out = {"nf4": [0, 0], "trainable": [0, 0], "frozen": [0, 0]}
    nf4_buffers = [(n, b) for n, b in model.named_buffers() if "_nf4_" in n]   # NF4 storage outside FSDP2
    for n, p in list(model.named_parameters()) + nf4_buffers:
        local = p.to_local() if hasattr(p, "to_local") else p
        kind = "nf4" if "_nf4_" in n else "trainable" if p.requires_grad else "frozen"
        out[kind][0] += local.numel()
        out[kind][1] += p.numel()
    return out


def main(spec_path: str) -> int:
    spec = json.load(open(spec_path))
    rank = int(os.environ["RANK"])
    if spec.get("own_group", True):
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    fail = spec.get("fail")
    checks = {"paged": paged_adamw_on_shards()} if spec.get("paged") else {}

    def callback(rec):
        if fail and fail["rank"] == rank and rec["step"] == fail["step"]:
            if fail["how"] == "exit":
                os._exit(3)
            if fail["how"] == "hang":
                time.sleep(3600)
            raise RuntimeError(f"the test's failure on rank {rank}")

    report = []
    code = 0
    for run in spec["runs"]:
        opts = dict(run["opts"])
        if rank == 1:
            opts.update(run.get("opts_rank1", {}))
        t0 = time.time()
        if run.get("copy_from"):   # resume a copy of an earlier run of this launch
            if rank == 0:
                shutil.copytree(run["copy_from"], run["out"])
            dist.barrier()
        try:
            data = run.get("data_rank1", run["data"]) if rank == 1 else run["data"]
            res = lorart.train(run["model"], data, eval_data=run["eval"], output_dir=run["out"],
                               resume=run.get("resume", False), progress=False, callback=callback, **opts)
            report.append({"out": run["out"], "history": res.history, "adapter_dir": res.adapter_dir,
                           "seconds": time.time() - t0, "held": held(res.model)})
        except Exception as e:  # noqa: BLE001 - reported to the test
            report.append({"out": run["out"], "error": type(e).__name__, "message": str(e),
                           "reported_by": getattr(e, "reported_by", None), "seconds": time.time() - t0,
                           "traceback": traceback.format_exc()})
            code = 2
            if not run.get("expect_error"):
                break
    with open(os.path.join(spec["report"], f"rank{rank}.json"), "w") as f:
        json.dump({"runs": report, **checks}, f)
    if spec.get("own_group", True) and code == 0:
        dist.destroy_process_group()
    if any(r.get("error") == "DistributedError" for r in report):
        # as `lorart train` does (cli.run): a rank that lost its peers leaves without torch's teardown, which can
        # abort (SIGABRT) while the peer is being killed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
