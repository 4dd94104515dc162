"""``turbo image build | push``: the serving image through the Docker SDK."""

from __future__ import annotations

import argparse
import json
import sys


def _image_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from turbo_core.hf import models
    from turbo_core.rollout import image

    name, path = models.resolve(args.model)
    wheelhouse = Path(args.wheelhouse)
    if not (wheelhouse / "requirements.txt").is_file():
        print(f"building the wheelhouse in {wheelhouse}", file=sys.stderr)
        image.build_wheelhouse(wheelhouse, include_torch=not args.no_torch_wheel)
    built = image.build(model_dir=path, plan_path=Path(args.plan), model_name=name,
                        variant=args.variant, repository=args.repository, wheelhouse=wheelhouse,
                        base_image=args.base_image, mlflow_run_id=args.mlflow_run_id)
    print(json.dumps({"tag": built.tag, "image_id": built.image_id}))
    return 0


def _image_push(args: argparse.Namespace) -> int:
    from turbo_core.rollout import image

    digest = image.push(args.tag)
    repo = args.tag.rpartition(":")[0]
    print(json.dumps({"tag": args.tag, "digest": digest, "reference": f"{repo}@{digest}"}))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    im = sub.add_parser("image", help="build and push the serving image (Docker SDK)")
    im_sub = im.add_subparsers(dest="image_cmd", required=True)
    ib = im_sub.add_parser("build", help="wheelhouse + context + docker build")
    ib.add_argument("--model", default="smollm2")
    ib.add_argument("--variant", required=True)
    ib.add_argument("--plan", required=True, help="bit plan JSON baked into the image")
    ib.add_argument("--repository", default="127.0.0.1:5000/turbo-attention")
    ib.add_argument("--base-image", default="turbo-base:bookworm-py311-gxx-pydev",
                    help="a CUDA PyTorch runtime image in production; default: the local "
                         "debootstrap base (docker/base/make_base.sh)")
    ib.add_argument("--wheelhouse", default="build/wheelhouse")
    ib.add_argument("--no-torch-wheel", action="store_true",
                    help="leave torch out (the base image provides it)")
    ib.add_argument("--mlflow-run-id", default="none")
    ib.set_defaults(func=_image_build)
    ip = im_sub.add_parser("push", help="push a tag, print its digest")
    ip.add_argument("tag")
    ip.set_defaults(func=_image_push)
