"""Publish a finished run dir to the Hugging Face Hub: one commit with the merged model (a plain transformers
checkpoint) and its tokenizer, the model card, continual_metrics.json, the plots and the ledger. Cluster nodes are
often offline and the login node is not: train with `--save_merged true` (the recipes' default), then publish from
anywhere that has the run dir, network and a write token (`--hub_token` or `hf auth login`).

    python recipes/publish.py runs/order1/jumplora_inclora/seed42 --hub_model_id me/smollm2-jumplora-order1
    python recipes/publish.py RUN_DIR --hub_model_id ID --hub_private_repo --no_ledger
    python recipes/publish.py RUN_DIR --hub_model_id ID --base_model models/SmolLM2-135M-Instruct   # no merged/: rebuilt from the ledger
    python recipes/publish.py RUN_DIR --hub_model_id ID --stage_only out/   # write the folder that would be pushed, offline
    python recipes/publish.py RUN_DIR --hub_model_id ID --retry_pending     # upload the per-task pushes a run left staged
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep instead of spinning

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished run dir (continual_metrics.json, ledger/, merged/)")
    parser.add_argument("--hub_model_id", required=True, help="the repo to push to, e.g. me/my-model")
    parser.add_argument("--hub_token", default=None, help="a write token (default: the logged-in one)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    parser.add_argument("--no_ledger", action="store_true", help="leave the ledger out")
    parser.add_argument("--merged_dir", default=None, help="the merged model (default: RUN_DIR/merged)")
    parser.add_argument(
        "--base_model", default=None, help="without a merged model: rebuild it from this base + the ledger"
    )
    parser.add_argument(
        "--stage_only", metavar="DIR", default=None, help="write the folder to DIR instead of pushing it"
    )
    parser.add_argument(
        "--retry_pending",
        action="store_true",
        help="upload, in task order, the per-task pushes a run left staged in RUN_DIR/hub_pending (nothing else)",
    )
    return parser.parse_args(argv)


def main(argv=None, api=None) -> int:
    args = parse_args(argv)
    from jumplora_hf.files import read_json
    from jumplora_hf.hub import HubPublisher

    metrics = os.path.join(args.run_dir, "continual_metrics.json")
    if not os.path.exists(metrics):
        print(
            f"error: {args.run_dir} has no continual_metrics.json: it is not a run dir, or no task has finished",
            file=sys.stderr,
        )
        return 2
    if args.retry_pending:
        publisher = HubPublisher(args.run_dir, args.hub_model_id, api=api, token=args.hub_token)
        queued = publisher.retry_pending()
        failures = publisher.wait()
        print(
            f"{queued - len(failures)} of {queued} staged push(es) uploaded"
            + (f"; failed: {failures}" if failures else "")
        )
        return 1 if failures else 0
    merged = args.merged_dir or os.path.join(args.run_dir, "merged")
    with tempfile.TemporaryDirectory(prefix="jumplora_publish_") as tmp:
        if not os.path.isdir(merged):
            if args.base_model is None:
                print(
                    f"error: no merged model at {merged}: pass --merged_dir, or --base_model to rebuild it from the "
                    "ledger",
                    file=sys.stderr,
                )
                return 2
            from jumplora_hf.ledger import TaskLedger, load_model, save_model

            merged = os.path.join(tmp, "rebuilt")
            save_model(TaskLedger(args.run_dir).compose(load_model(args.base_model)), merged, args.base_model)
        publisher = HubPublisher(
            args.run_dir,
            args.hub_model_id,
            api=api if args.stage_only is None else object(),
            token=args.hub_token,
            private=args.hub_private_repo or None,
            push_ledger=not args.no_ledger,
        )
        report = read_json(metrics)
        if args.stage_only is not None:
            os.makedirs(args.stage_only, exist_ok=True)
            publisher.stage(args.stage_only, merged, report, [t["tag"] for t in publisher.pushes()["tasks"]])
            print(f"staged in {args.stage_only}")
            return 0
        commit = publisher.push_final(report, merged_dir=merged)
        print(f"pushed {args.run_dir} to https://huggingface.co/{publisher.repo_id} (commit {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
