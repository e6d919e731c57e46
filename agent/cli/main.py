"""``backup-agent``: the command line.

Verbs: ``run`` (the service), ``config --show`` (the effective configuration), the
chain and repository commands that work without a running agent (``repository init``
among them), and the operator's
commands that talk to the running agent's API (``backup``, ``jobs``, ``cancel``,
``status``).
A configuration problem is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.errors import AgentError, ConfigError
from agent.core.paths import DEFAULT_CONFIG_PATH

if TYPE_CHECKING:
    from agent.core.config import AgentConfig

# The configuration (pydantic), logging (structlog) and asyncio are imported once the
# arguments are parsed: `backup-agent --help` needs none of them.

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backup-agent", description="Incremental backups of libvirt domains."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    config_help = (
        f"configuration file (TOML); default: {DEFAULT_CONFIG_PATH} if it exists, "
        "else the embedded defaults"
    )
    run = verbs.add_parser("run", help="run the agent in the foreground")
    run.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    show = verbs.add_parser("config", help="inspect the configuration")
    show.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    show.add_argument(
        "--show",
        action="store_true",
        required=True,
        help="print the effective configuration as TOML",
    )
    _chain_verbs(verbs, config_help)
    _backup_verb(verbs, config_help)
    _control_verbs(verbs, config_help)
    _repository_verbs(verbs, config_help)
    _repository_admin_verbs(verbs, config_help)
    return parser


def _chain_verbs(verbs: Any, config_help: str) -> None:
    """``checkpoints``, ``reconcile``, ``ledger export|import``."""
    cps = verbs.add_parser("checkpoints", help="print a domain's checkpoint chain from the ledger")
    cps.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    cps.add_argument("--json", action="store_true", help="machine-readable output")
    cps.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    rec = verbs.add_parser("reconcile", help="repair a domain's checkpoints in libvirt now")
    rec.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    rec.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    ledger = verbs.add_parser("ledger", help="export or import a domain's chain (JSON)")
    ledger_verbs = ledger.add_subparsers(dest="ledger_verb", required=True, metavar="ACTION")
    export = ledger_verbs.add_parser("export", help="write a domain's chain as JSON")
    export.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    export.add_argument("--output", "-o", type=Path, metavar="FILE", help="default: stdout")
    export.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    imp = ledger_verbs.add_parser("import", help="add a chain exported on another host")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument(
        "--replace", action="store_true", help="replace what the ledger holds for that domain"
    )
    imp.add_argument("--config", type=Path, metavar="FILE", help=config_help)


def _backup_verb(verbs: Any, config_help: str) -> None:
    """``backup`` (through the running agent, or ``--local``)."""
    bk = verbs.add_parser("backup", help="ask the running agent to back up a domain now")
    bk.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    bk.add_argument(
        "--mode",
        choices=["auto", "full", "incremental"],
        default="auto",
        help="auto: incremental where the chain allows, full per disk elsewhere",
    )
    bk.add_argument(
        "--wait", action="store_true", help="wait for the job to end (progress bar on a terminal)"
    )
    bk.add_argument(
        "--local",
        action="store_true",
        help="run the backup in this process instead, with no agent running",
    )
    bk.add_argument("--config", type=Path, metavar="FILE", help=config_help)


def _repository_verbs(verbs: Any, config_help: str) -> None:
    """``backups``, ``restore``, ``verify``: the repository read directly."""
    lst = verbs.add_parser("backups", help="list a domain's backups in the repository")
    lst.add_argument("domain", metavar="DOMAIN", help="domain name")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    rs = verbs.add_parser("restore", help="write a standalone image of a backed-up disk")
    rs.add_argument("domain", metavar="DOMAIN", help="domain name")
    rs.add_argument("--backup", required=True, metavar="ID", help="backup id (see `backups`)")
    rs.add_argument("--disk", metavar="TARGET", help="e.g. vda; default: every disk")
    rs.add_argument(
        "--to",
        type=Path,
        metavar="PATH",
        help="the image file (with --disk), else a directory; with --define, the directory "
        "of the restored images (default: where each disk's image was)",
    )
    rs.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    rs.add_argument(
        "--define",
        action="store_true",
        help="the whole VM: every disk restored and the domain defined from the definition "
        "recorded with the backup",
    )
    rs.add_argument(
        "--name", metavar="NEW", help="with --define: this name, a new UUID and new MAC addresses"
    )
    rs.add_argument("--start", action="store_true", help="with --define: start it, too")
    rs.add_argument(
        "--json",
        action="store_true",
        help="the result as one JSON object on stdout, progress as JSON lines on stderr",
    )
    rs.add_argument(
        "--no-digest-check",
        action="store_true",
        help="do not compare the result with the point's digest (after `verify` found "
        "the backup sound: see the README, 'A digest of each whole point')",
    )
    rs.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    ex = verbs.add_parser("export", help="serve one disk of a backup point over NBD until stopped")
    ex.add_argument("domain", metavar="DOMAIN", help="domain name")
    ex.add_argument("--backup", required=True, metavar="ID", help="backup id (see `backups`)")
    ex.add_argument("--disk", metavar="TARGET", help="e.g. vda; needed if the backup has several")
    where = ex.add_mutually_exclusive_group()
    where.add_argument(
        "--socket", type=Path, metavar="PATH", help="a Unix socket (default: in the run directory)"
    )
    where.add_argument("--port", type=_port, metavar="N", help="TCP on 127.0.0.1 at port N")
    ex.add_argument(
        "--overlay",
        type=Path,
        metavar="FILE",
        help="serve writable, into this new qcow2 overlay on top of the chain (kept afterwards)",
    )
    ex.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    fl = verbs.add_parser("files", help="list or copy files in a backup point's guest filesystem")
    fl.add_argument("domain", metavar="DOMAIN", help="domain name")
    fl.add_argument("--backup", required=True, metavar="ID", help="backup id (see `backups`)")
    fl.add_argument("--disk", metavar="TARGET", help="e.g. vda; needed if the backup has several")
    fl.add_argument(
        "--fs", metavar="DEVICE", help="the filesystem to mount at / (e.g. /dev/sda2), as listed"
    )
    file_verbs = fl.add_subparsers(dest="files_verb", required=True, metavar="ACTION")
    fls = file_verbs.add_parser("ls", help="list a directory of the guest (like ls -la)")
    fls.add_argument("path", metavar="PATH", help="absolute path in the guest")
    fls.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    fget = file_verbs.add_parser("get", help="copy a file or directory out of the guest")
    fget.add_argument("path", metavar="PATH", help="absolute path in the guest")
    fget.add_argument(
        "--to", required=True, type=Path, metavar="DIR", help="existing directory to copy into"
    )
    fget.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    vf = verbs.add_parser("verify", help="re-read backups and check them against their manifests")
    vf.add_argument("domain", metavar="DOMAIN", help="domain name")
    vf.add_argument("--backup", metavar="ID", help="default: every backup of the domain")
    vf.add_argument("--config", type=Path, metavar="FILE", help=config_help)


def _repository_admin_verbs(verbs: Any, config_help: str) -> None:
    """``repository init``: which repository this agent uses."""
    repo = verbs.add_parser("repository", help="set up the backup repository this agent uses")
    repo_verbs = repo.add_subparsers(dest="repository_verb", required=True, metavar="ACTION")
    init = repo_verbs.add_parser(
        "init",
        help="make PATH this agent's repository: initialise it (missing or empty) or adopt "
        "the repository there (its marker's id recorded in the state directory)",
    )
    init.add_argument(
        "path", nargs="?", type=Path, metavar="PATH", help="default: the configured repository"
    )
    init.add_argument(
        "--replace",
        action="store_true",
        help="use PATH's repository (or a new one) even though this agent uses another",
    )
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.add_argument("--config", type=Path, metavar="FILE", help=config_help)


def _control_verbs(verbs: Any, config_help: str) -> None:
    """The verbs that talk to the running agent (besides ``backup``)."""
    jb = verbs.add_parser("jobs", help="list the running agent's jobs, newest first")
    jb.add_argument("--domain", metavar="DOMAIN", help="only this domain's")
    jb.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    jb.add_argument("--json", action="store_true", help="machine-readable output")
    jb.add_argument(
        "--limit",
        type=_page_size,
        default=100,
        metavar="N",
        help="the newest N (1-1000; default 100)",
    )
    jb.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    cn = verbs.add_parser("cancel", help="cancel a queued or running job")
    cn.add_argument("job", metavar="ID", help="job id (see `jobs`)")
    cn.add_argument("--config", type=Path, metavar="FILE", help=config_help)
    st = verbs.add_parser("status", help="domains, chains, last backups and running jobs")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("--config", type=Path, metavar="FILE", help=config_help)


def _port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number from 1 to 65535")
    return int(value)


def _page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number from 1 to 1000")
    return int(value)


def _config_path(given: Path | None) -> Path | None:
    if given is not None:
        return given
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


async def _run(config: AgentConfig) -> None:
    import asyncio  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from agent.service import Agent  # noqa: PLC0415 - keeps `config --show` free of libvirt

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await Agent(config).run(stop)


def main(argv: Sequence[str] | None = None) -> int:
    # Whatever the agent or a verb makes (images, manifests, scratch, restores, sockets,
    # the ledger) is root's alone, also outside systemd (whose unit sets the same).
    os.umask(0o077)
    args = _parser().parse_args(argv)
    if args.verb in _API_VERBS and not getattr(args, "local", False):
        return _control(args)
    from agent.core.config import load_config, render_toml  # noqa: PLC0415 - see above
    from agent.core.logs import configure_logging  # noqa: PLC0415

    try:
        config = load_config(_config_path(args.config))
    except ConfigError as exc:
        print(f"backup-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.verb == "config":
        sys.stdout.write(render_toml(config))
        return 0
    configure_logging(config.logging.level, config.logging.format)
    try:
        return _dispatch(args, config)
    except AgentError as exc:
        print(f"backup-agent: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, config: AgentConfig) -> int:
    """Run the verb; its exit status (0, or 1 when `verify` found problems)."""
    # Imported here: `config --show` runs without libvirt.
    from agent.cli import backups as cli_backups  # noqa: PLC0415
    from agent.cli import chains as cli_chains  # noqa: PLC0415

    if args.verb == "run":
        import asyncio  # noqa: PLC0415

        asyncio.run(_run(config))
    elif args.verb == "backup":  # (--local: the others are in _control)
        cli_backups.backup(config, args.domain, args.mode)
    elif args.verb == "backups":
        cli_backups.list_backups(config, args.domain, args.json)
    elif args.verb in ("restore", "export", "files"):
        return _point_verbs(args, config)
    elif args.verb == "verify":
        return cli_backups.verify(config, args.domain, args.backup)
    elif args.verb == "checkpoints":
        cli_chains.show_checkpoints(config, args.domain, args.json)
    elif args.verb == "reconcile":
        cli_chains.reconcile(config, args.domain)
    elif args.verb == "repository":
        from agent.cli import repository as cli_repository  # noqa: PLC0415

        cli_repository.init(config, args.path, args.replace, args.json)
    elif args.ledger_verb == "export":
        cli_chains.export_chain(config, args.domain, args.output)
    else:
        cli_chains.import_chain(config, args.file, args.replace)
    return 0


def _point_verbs(args: argparse.Namespace, config: AgentConfig) -> int:
    """The verbs that give a backup point back: restore, export, files."""
    from agent.cli import backups as cli_backups  # noqa: PLC0415

    if args.verb == "restore" and (args.define or args.name or args.start):
        cli_backups.restore_vm(
            config,
            args.domain,
            args.backup,
            args.disk,
            args.to,
            args.format,
            define=args.define,
            name=args.name,
            start=args.start,
            check_digest=not args.no_digest_check,
            as_json=args.json,
        )
    elif args.verb == "restore":
        cli_backups.restore(
            config,
            args.domain,
            args.backup,
            args.disk,
            args.to,
            args.format,
            check_digest=not args.no_digest_check,
            as_json=args.json,
        )
    elif args.verb == "export":
        from agent.cli import export as cli_export  # noqa: PLC0415

        return cli_export.export(
            config, args.domain, args.backup, args.disk, args.socket, args.port, args.overlay
        )
    elif args.verb == "files":
        from agent.cli import files as cli_files  # noqa: PLC0415 - libguestfs only here

        return cli_files.files(
            config,
            args.domain,
            args.backup,
            args.disk,
            args.fs,
            args.files_verb,
            args.path,
            getattr(args, "to", None),
        )
    return 0


_API_VERBS = ("backup", "jobs", "cancel", "status")


def _control(args: argparse.Namespace) -> int:
    """A verb that only talks to the running agent: the configuration file's ``[http]``
    read without the rest (:mod:`agent.core.config_file`), no logging set up, and the
    standard library's HTTP client."""
    from agent.cli import control as cli_control  # noqa: PLC0415
    from agent.core.config_file import api_endpoint  # noqa: PLC0415

    try:
        endpoint = api_endpoint(_config_path(args.config))
    except ConfigError as exc:
        print(f"backup-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.verb == "backup":
            return cli_control.backup(endpoint, args.domain, args.mode, args.wait)
        if args.verb == "jobs":
            return cli_control.jobs(endpoint, args.domain, args.state, args.json, args.limit)
        if args.verb == "cancel":
            return cli_control.cancel(endpoint, args.job)
        return cli_control.status(endpoint, args.json)
    except AgentError as exc:
        print(f"backup-agent: {exc}", file=sys.stderr)
        return 1
