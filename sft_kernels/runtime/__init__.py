"""Runtime: joins data, split, codecs and the channel into jobs.

* :class:`CloudServer` / :class:`CloudSession` -- the cloud side (``sft serve``);
* :class:`EdgeTrainer` -- the edge side (``sft train``);
* :class:`RunConfig` -- what both sides agree on;
* :func:`run_demo` -- ``sft demo`` / ``make demo``; :func:`codec_report` -- ``sft codecs``;
* :func:`make_runner` -- a run driven one batch at a time (the GLUE harness's runners).
"""
from .cloud import CloudServer, CloudSession, SessionLimits
from .codec_report import DEFAULT_CODECS, CodecReport, codec_report
from .config import RunConfig
from .edge import EdgeTrainer, TrainSummary
from .link import CloudError, LinkLost, TcpLink
from .remote import RemoteSplit, RemoteSplitCallback
from .jobs import LocalCloud, StepBatches, run_demo, train_and_evaluate
from .runners import Runner, make_runner

__all__ = ["CloudServer", "CloudSession", "SessionLimits", "RunConfig", "EdgeTrainer", "TrainSummary", "CloudError", "LinkLost", "TcpLink", "RemoteSplit", "RemoteSplitCallback",
           "LocalCloud", "StepBatches", "train_and_evaluate", "run_demo", "DEFAULT_CODECS", "CodecReport",
           "codec_report", "Runner", "make_runner"]
