"""Submit a merge to a Ray cluster from a laptop, follow its logs, report the final status.

python -m merge_jobs.submit --address http://127.0.0.1:8265 --adapter-name calendar
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass

__all__ = ["JobOutcome", "main", "submit_merge"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str
    message: str
    logs: str
    seconds: float


def submit_merge(
    address: str,
    merge_args: list[str],
    *,
    working_dir: str = ".",
    follow: bool = True,
    timeout_s: float = 1800.0,
    env_vars: dict[str, str] | None = None,
) -> JobOutcome:
    """Submit ``python -m merge_jobs <merge_args>`` as a Ray job and wait for it to end."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = "python -m merge_jobs " + " ".join(merge_args)
    runtime_env: dict[str, object] = {
        "working_dir": working_dir,
        "excludes": [".venv", "storage", ".cache", ".git"],
    }
    if env_vars:
        runtime_env["env_vars"] = env_vars
    t0 = time.perf_counter()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    logger.info("submitted merge job %s: %s", job_id, entrypoint)
    if follow:
        asyncio.run(_follow(client, job_id, timeout_s))
    deadline = t0 + timeout_s
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        if time.perf_counter() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"merge job {job_id} did not finish in {timeout_s}s; stopped")
        time.sleep(0.5)
    info = client.get_job_info(job_id)
    return JobOutcome(
        job_id, str(status.value), info.message or "", client.get_job_logs(job_id), time.perf_counter() - t0
    )


async def _follow(client: object, job_id: str, timeout_s: float) -> None:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):  # type: ignore[attr-defined]
            sys.stderr.write(lines)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tail(), timeout_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m merge_jobs.submit", description=__doc__.split("\n")[0])
    p.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard / job server address")
    p.add_argument("--working-dir", default=".")
    p.add_argument("--no-follow", action="store_true")
    args, merge_args = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = submit_merge(args.address, merge_args, working_dir=args.working_dir, follow=not args.no_follow)
    print(f"job {out.job_id}: {out.status} in {out.seconds:.1f}s {out.message}")
    return 0 if out.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
