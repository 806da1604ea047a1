"""``lora-moe pipeline compile|run|submit|schedule|images``: the Kubeflow pipelines of ``pipelines/`` from the
command line.

Registered with ``lora-moe`` through the ``lora_moe.commands`` entry point (pyproject.toml), so the library never
imports the Kubeflow layer; nothing here imports kfp or torch before a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from lora_moe_core.defaults import EXPERIMENT
from lora_moe_core.errors import UserError


def _settings(args: argparse.Namespace):
    """The compile-time cluster settings: defaults, the LORA_MOE_GPU_* environment, then the flags."""
    from components.k8s import ClusterSettings, SettingsError, Toleration, parse_selector

    try:
        overrides = {
            "image_tag": args.image_tag,
            "image_registry": args.image_registry,
            "accelerator_type": args.accelerator_type,
            "shm_size": args.shm_size,
            "gpu_cpu_request": args.gpu_cpu_request,
            "gpu_memory_request": args.gpu_memory_request,
            "gpu_retries": args.gpu_retries,
            "train_timeout_s": args.train_timeout_s,
            "s3_endpoint_url": args.s3_endpoint_url,
            "mlflow_tracking_uri": args.mlflow_tracking_uri,
            "s3_secret": args.s3_secret,
            "mlflow_secret": args.mlflow_secret,
            "gpu_node_selector": parse_selector(args.gpu_node_selector) if args.gpu_node_selector is not None else None,
            "gpu_tolerations": tuple(Toleration.parse(t) for t in args.gpu_toleration) if args.gpu_toleration else None,
            "image_pull_secrets": tuple(args.image_pull_secret) if args.image_pull_secret else None,
            "run_as_user": args.run_as_user,
        }
        return ClusterSettings.from_env(**overrides).validate()
    except SettingsError as exc:
        raise UserError(str(exc)) from None


def _add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster settings (compile time; defaults match manifests/)")
    group.add_argument("--image_tag", help="tag of both images (default: $LORA_MOE_IMAGE_TAG or dev)")
    group.add_argument("--image_registry", help="registry of the images (default: $LORA_MOE_IMAGE_REGISTRY)")
    group.add_argument(
        "--gpu_node_selector",
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="labels of the GPU node pool (default: $LORA_MOE_GPU_NODE_SELECTOR or lora-moe/pool=gpu)",
    )
    group.add_argument(
        "--gpu_toleration",
        action="append",
        metavar="KEY[=VALUE][:EFFECT]",
        help="toleration of the GPU nodes' taint, repeatable (default: nvidia.com/gpu:NoSchedule)",
    )
    group.add_argument("--accelerator_type", help="GPU resource name (default: nvidia.com/gpu)")
    group.add_argument("--shm_size", help="memory-backed /dev/shm of GPU steps (default: 32Gi)")
    group.add_argument("--gpu_cpu_request", help="CPU request of GPU steps (default: 8)")
    group.add_argument("--gpu_memory_request", help="memory request of GPU steps (default: 96Gi)")
    group.add_argument("--gpu_retries", type=int, help="retries of a GPU step, e.g. on pre-emption (default: 2)")
    group.add_argument("--train_timeout_s", type=int, help="time limit of a training step (default: 3 days)")
    group.add_argument(
        "--s3_endpoint_url", help="MinIO/S3 endpoint the steps use, no credentials in it (default: http://minio:9000)"
    )
    group.add_argument(
        "--mlflow_tracking_uri",
        help="MLflow server the steps log to, no credentials in it (default: http://mlflow:5000)",
    )
    group.add_argument(
        "--s3_secret", help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default: minio-credentials)"
    )
    group.add_argument(
        "--mlflow_secret",
        help="optional Secret with MLFLOW_TRACKING_USERNAME/_PASSWORD/_TOKEN (default: mlflow-credentials)",
    )
    group.add_argument("--image_pull_secret", action="append", help="image pull secret, repeatable")
    group.add_argument(
        "--run_as_user",
        type=int,
        help="uid (and gid) of the task containers; the USER of images/*.Dockerfile (default: 10001)",
    )


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        help="KFP API, e.g. http://localhost:8080 (default: $KFP_HOST); auth from "
        "$KFP_TOKEN, $KF_PIPELINES_SA_TOKEN_PATH or $KFP_COOKIES",
    )
    parser.add_argument("--namespace", help="KFP namespace of a multi-user install (default: $KFP_NAMESPACE)")
    parser.add_argument("--pipeline", choices=("training", "inference"), default="training", help="which pipeline")
    parser.add_argument("--package", help="compiled pipeline YAML (default: compile now with the cluster settings)")
    parser.add_argument("--experiment", default=EXPERIMENT, help="KFP experiment (created when missing)")
    parser.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="pipeline argument, repeatable; VALUE is JSON when it parses (numbers, lists)",
    )
    parser.add_argument("--version", help="upload the package as this pipeline version first (shown in the UI)")
    parser.add_argument("--pipeline_name", help="KFP pipeline to add --version to (default: the package's name)")
    _add_cluster_flags(parser)


def _add_images_parser(actions) -> None:
    from pipelines.image_build import DEFAULT_BASE, LOCAL_BASE, TORCH_CPU_INDEX

    images = actions.add_parser("images", help="build (and push) the trainer and CPU images with the Docker SDK")
    images.add_argument("--context", default=".", help="the repository root (default: here)")
    images.add_argument("--registry", help="registry of the tags (default: $LORA_MOE_IMAGE_REGISTRY)")
    images.add_argument("--tag", default="", help="tag of both images (default: the commit, -dirty if changed)")
    images.add_argument("--only", action="append", choices=("lora-moe-trainer", "lora-moe-cpu"), help="one image")
    images.add_argument("--base_image", default=DEFAULT_BASE, help="the Dockerfiles' PYTHON_IMAGE (python3.11)")
    images.add_argument("--make_base", action="store_true",
                        help=f"first make {LOCAL_BASE} here (debootstrap, root): no registry")  # fmt: skip
    images.add_argument("--index_url", default="", help="PyPI mirror for the builds (default: pypi.org)")
    images.add_argument("--extra_index_url", default="", help="a second package index")
    images.add_argument("--torch_variant", choices=("cuda", "cpu"), default="cuda",
                        help="the trainer's torch: cuda (the cluster) or cpu (local runs, CI)")  # fmt: skip
    images.add_argument("--torch_index_url", default=TORCH_CPU_INDEX,
                        help="where CPU torch comes from; '' = only from --wheels (air-gapped)")  # fmt: skip
    images.add_argument("--ca_bundle", type=Path, help="CA bundle pip trusts in the builds (TLS-inspecting proxy)")
    images.add_argument("--wheels", type=Path, help="folder of wheels pip may take first (e.g. CPU torch)")
    images.add_argument("--push", action="store_true", help="push each image after building it")
    images.set_defaults(handler=_images)


def _images(args: argparse.Namespace) -> int:
    from pipelines.docker_run import engine
    from pipelines.image_build import LOCAL_BASE, ImageBuild, build_images, make_base_image

    names = tuple(args.only or ("lora-moe-trainer", "lora-moe-cpu"))
    base = LOCAL_BASE if args.make_base else args.base_image
    build = ImageBuild(context=Path(args.context), registry=args.registry or None, tag=args.tag, names=names,
                       base_image=base, index_url=args.index_url, extra_index_url=args.extra_index_url,
                       torch_variant=args.torch_variant, torch_index_url=args.torch_index_url,
                       ca_bundle=args.ca_bundle, wheels=args.wheels, push=args.push)  # fmt: skip
    client = engine("lora-moe pipeline images")
    built = [make_base_image(client)] if args.make_base else []
    built += build_images(client, build)
    for image in built:
        print(f"built {image.ref}: {image.size_bytes / 1e9:.2f} GB in {image.seconds:.0f} s")
    return 0


# -- commands ---------------------------------------------------------------------------------------------------
def _compile(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from pipelines.compile import compile_all

    for name, path in compile_all(args.output_dir, settings).items():
        print(f"wrote {path} ({name}; images {settings.trainer_image}, {settings.light_image})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.local_run import LocalRun, run_local
    from pipelines.submit import parse_params

    given = {
        name: getattr(args, name)
        for name in ("clips", "eval_clips", "cache_shards", "stage1_epochs", "stage2_epochs", "sample_steps")
        if getattr(args, name) is not None
    }
    given.update({name: tuple(getattr(args, name)) for name in ("clip_size", "sample_size") if getattr(args, name)})
    run = LocalRun(
        pipeline=args.pipeline,
        output_dir=Path(args.output_dir),
        store=args.store,
        tracking_uri=args.tracking_uri,
        overrides=parse_params(args.param),
        runner=args.runner,
        image_registry=args.image_registry,
        image_tag=args.image_tag,
        **given,
    )
    with warnings.catch_warnings():  # kfp.local's notes that cluster settings and custom images are ignored here
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            result = run_local(run)
        except RuntimeError as exc:  # a step failed: kfp.local printed its log and traceback above
            message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split())  # without kfp.local's colours
            print(f"error: {message} (its log is above)", file=sys.stderr)
            return 1
    print("\n" + "\n".join(result.summary()))
    return 0


@contextlib.contextmanager
def _package(args: argparse.Namespace) -> Iterator[Path]:
    """The pipeline package to send: ``--package`` checked, or one compiled into a temporary folder that is
    removed afterwards, whether the upload worked or not (it used to stay in $TMPDIR after every submit)."""
    if args.package:
        from pipelines.compile import load_ir

        load_ir(args.package)
        yield Path(args.package)
        return
    from pipelines.compile import PACKAGES, compile_pipeline

    settings = _settings(args)
    with tempfile.TemporaryDirectory(prefix="lora-moe-") as folder:
        yield compile_pipeline(args.pipeline, Path(folder) / PACKAGES[args.pipeline], settings)


def _submit(args: argparse.Namespace) -> int:
    from pipelines.submit import Connection, parse_params, submit_run

    connection = Connection.from_env(args.host, args.namespace)
    arguments = parse_params(args.param)
    with _package(args) as package:
        result = submit_run(
            connection,
            package,
            arguments,
            args.experiment,
            run_name=args.run_name,
            pipeline_name=args.pipeline_name,
            version=args.version,
            enable_caching=args.enable_caching,
        )
    if "version_id" in result:
        print(f"uploaded pipeline version {args.version} ({result['version_id']})")
    print(f"started run {result['run_id']} in experiment {args.experiment!r}: {result['run_url']}")
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from pipelines.submit import Connection, parse_params, schedule_run, validate_cron

    cron = validate_cron(args.cron)  # before anything else: a typo needs no cluster to be found
    connection = Connection.from_env(args.host, args.namespace)
    with _package(args) as package:
        result = schedule_run(
            connection,
            package,
            cron,
            args.job_name,
            args.experiment,
            parse_params(args.param),
            pipeline_name=args.pipeline_name,
            version=args.version,
            max_concurrency=args.max_concurrency,
            enabled=not args.paused,
        )
    state = "paused" if args.paused else "enabled"
    print(
        f"created recurring run {result['recurring_run_id']} ({args.job_name!r}, cron '{cron}', {state}) "
        f"in experiment {args.experiment!r}"
    )
    return 0


def add_pipeline_parser(commands) -> None:
    """Add ``pipeline compile|run|submit|schedule`` to the ``lora-moe`` sub-commands."""
    pipeline = commands.add_parser("pipeline", help="compile, run locally, submit or schedule the Kubeflow pipelines")
    actions = pipeline.add_subparsers(dest="pipeline_command", required=True)

    compile_ = actions.add_parser("compile", help="write the training and inference pipelines as KFP IR YAML")
    compile_.add_argument("--output_dir", default="outputs/pipelines", help="folder for the two YAML files")
    _add_cluster_flags(compile_)
    compile_.set_defaults(handler=_compile)

    run = actions.add_parser("run", help="run a pipeline here with kfp.local: the whole training DAG (tiny model, CPU)")
    run.add_argument(
        "--pipeline",
        choices=("training", "inference"),
        default="training",
        help="training (synthetic data → registered model) or inference (default model: the "
        "registry's lora-moe-surgical@candidate, e.g. from an earlier training run)",
    )
    run.add_argument("--output_dir", default="outputs/pipeline", help="run folder: artifacts, store, mlflow.db")
    run.add_argument(
        "--store",
        help="object store for big data: a folder (default <output_dir>/store) or "
        "s3://bucket/prefix (S3_ENDPOINT_URL, AWS_* from the environment)",
    )
    run.add_argument("--tracking_uri", help="MLflow (default: $MLFLOW_TRACKING_URI, else <output_dir>/mlflow.db)")
    run.add_argument("--clips", type=int, help="synthetic training clips (default 24)")
    run.add_argument("--eval_clips", type=int, help="synthetic held-out clips, another seed (default 8)")
    run.add_argument(
        "--clip_size",
        type=int,
        nargs=3,
        metavar=("W", "H", "F"),
        help="synthetic clip width, height, frames (default 128 96 33)",
    )
    run.add_argument("--cache_shards", type=int, help="latent-cache fan-out over dsl.ParallelFor (default 2)")
    run.add_argument("--stage1_epochs", type=int, help="Stage-1 epochs (default: configs/demo, 4)")
    run.add_argument("--stage2_epochs", type=int, help="Stage-2 epochs (default: configs/demo, 8)")
    run.add_argument(
        "--sample_size",
        type=int,
        nargs=3,
        metavar=("W", "H", "F"),
        help="evaluation and inference clip width, height, frames (default 64 48 17)",
    )
    run.add_argument("--sample_steps", type=int, help="denoising steps of generated clips (default 4)")
    run.add_argument("--param", action="append", metavar="NAME=VALUE", help="any other pipeline argument")
    run.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                     help="subprocess: each step a process of this venv; docker: each step a container of the "
                     "pipeline's images (build them with `lora-moe pipeline images`)")  # fmt: skip
    run.add_argument("--image_tag", help="--runner docker: tag of both images (default: $LORA_MOE_IMAGE_TAG or dev)")
    run.add_argument("--image_registry", help="--runner docker: registry of the images ($LORA_MOE_IMAGE_REGISTRY)")
    run.set_defaults(handler=_run)

    _add_images_parser(actions)

    submit = actions.add_parser("submit", help="start a run on a KFP cluster (kfp.Client)")
    _add_connection_flags(submit)
    submit.add_argument("--run_name", help="run name (default: lora-moe-<time>)")
    submit.add_argument("--enable_caching", action="store_true", help="reuse cached step results (default: off)")
    submit.set_defaults(handler=_submit)

    schedule = actions.add_parser("schedule", help="create a recurring run (retraining) on a KFP cluster")
    schedule.add_argument(
        "--cron", required=True, help="6 fields: second minute hour day-of-month month day-of-week, e.g. '0 0 3 * * *'"
    )
    schedule.add_argument("--job_name", default="lora-moe-retrain", help="name of the recurring run")
    schedule.add_argument("--max_concurrency", type=int, default=1, help="runs of this schedule at once")
    schedule.add_argument("--paused", action="store_true", help="create the schedule disabled")
    _add_connection_flags(schedule)
    schedule.set_defaults(handler=_schedule)
