"""Command line of the converters: ``python -m data_prep <command>`` or ``ddmpi-prep <command>``.

Converter modules are imported only for the command that runs, so ``--help`` is quick.
"""

import argparse
import logging
import sys
from pathlib import Path

from ddmpi.data.schema import DatasetError

EXAMPLES = """\
examples:
  %(prog)s digits --out data/digits.h5
  %(prog)s mnist --src ../shared/data/mnist --out data/mnist.h5
  %(prog)s mnist --src data/raw/fashion --variant fashion --download --out data/fashion.h5
  %(prog)s cifar --src data/raw/cifar10 --download --out data/cifar10.h5
  %(prog)s images --src data/raw/orl_faces --mode grey --out data/orl.h5
  %(prog)s nifti --manifest ../shared/data/lidc-nodules/labels.csv --group-column patient \\
      --shape 32 32 16 --window -1000 400 --out data/lidc.h5

Every command writes one HDF5 file in the ddmpi format (docs/dataset-format.md), atomically:
on any error nothing is left at --out. Exit status: 0 done, 1 bad input, 2 bad usage.
"""


def main(argv=None):
    """Run one converter; return the exit status."""
    prog = "python -m data_prep" if Path(sys.argv[0]).name == "__main__.py" else "ddmpi-prep"
    args = build_parser(prog).parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    logger = logging.getLogger("data_prep")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        summary = RUNNERS[args.command](args)
    except (DatasetError, OSError) as err:  # bad input, unwritable --out, full disk...
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written to {args.out}", file=sys.stderr)
        return 130
    finally:
        logger.removeHandler(handler)
    print(summary)
    return 0


def build_parser(prog="ddmpi-prep"):
    """The argument parser with one sub-command per converter."""
    parser = argparse.ArgumentParser(
        prog=prog, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert an image data set to the ddmpi HDF5 format (train/val/test "
                    "splits, images in [0, 1] stored as float32 or uint8, provenance with "
                    "sha256 of every input).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()

    def command(name, help_text, description):
        return commands.add_parser(name, parents=[common], help=help_text,
                                   description=description,
                                   formatter_class=_DefaultsFormatter)

    p = command("mnist", "MNIST / Fashion-MNIST IDX files (.gz or raw)",
                "MNIST or Fashion-MNIST from the four IDX files (train-images-idx3-ubyte, "
                "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each "
                "raw or .gz) in --src. The official test split is kept as test and val is "
                "carved from train; if only one pair of files is present (e.g. the t10k files "
                "alone) it is split into train/val/test.")
    p.add_argument("--src", required=True, type=Path, metavar="DIR",
                   help="folder with the IDX files (created by --download if missing)")
    p.add_argument("--variant", choices=("mnist", "fashion"), default="mnist",
                   help="which data set: class names and download mirrors")
    _download_options(p)

    p = command("cifar", "CIFAR-10 / CIFAR-100 python pickle batches",
                "CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, "
                "test, meta) python batches in --src or its cifar-10-batches-py/ or "
                "cifar-100-python/ folder. The official test batch is kept as test and val is "
                "carved from the training batches; without the test batch, test "
                "(--test-fraction, default 0.2) is drawn from the training batches, stratified.")
    p.add_argument("--src", required=True, type=Path, metavar="DIR",
                   help="folder with the batches (the archive is downloaded and extracted here "
                        "with --download)")
    p.add_argument("--variant", choices=("cifar10", "cifar100"), default=None,
                   help="which data set (default: detected from the files; cifar10 for "
                        "--download)")
    p.add_argument("--label-type", choices=("fine", "coarse"), default="fine",
                   help="CIFAR-100 labels: 100 fine classes or 20 coarse superclasses")
    _download_options(p)

    p = command("images", "image folders (PNG, JPEG, PGM, BMP, TIFF... via Pillow)",
                "Labelled image files: one sub-folder of --src per class (e.g. the AT&T/ORL "
                "faces s1..s40), a flat --src labelled by --label-regex, or a CSV --manifest. "
                "Every image is converted to grey or RGB and resized to --size.")
    _file_sources(p)
    p.add_argument("--label-regex", metavar="REGEX",
                   help="label each file of a flat --src by this regex on its relative path "
                        "(group 'label', else group 1), e.g. 'obj(\\d+)__'")
    p.add_argument("--size", type=_size, metavar="HxW",
                   help="resize every image to H rows x W columns (bilinear, antialiased); "
                        "default: the images' common size")
    p.add_argument("--mode", choices=("auto", "grey", "rgb"), default="auto",
                   help="channels: grey (1) or rgb (3); auto is rgb if any image has colour")

    p = command("nifti", "NIfTI CT/MR volumes (.nii, .nii.gz via nibabel)",
                "NIfTI volumes from class sub-folders of --src or a CSV --manifest (paths "
                "relative to the CSV; --group-column keeps e.g. each patient in one split). "
                "Volumes are reoriented to RAS+ (nibabel.as_closest_canonical), windowed to "
                "[0, 1], resampled to --shape and stored as (1, D, H, W) = (1, z, y, x).")
    _file_sources(p)
    p.add_argument("--shape", type=_positive_int, nargs=3, metavar=("X", "Y", "Z"),
                   help="target voxels along the canonical x, y, z axes (NIfTI order; stored "
                        "as D=Z, H=Y, W=X); default: the volumes' common shape")
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="intensity window mapped to [0, 1] and clipped, e.g. -1000 400 for "
                        "lung CT in HU; default: min-max of each volume")

    p = command("digits", "scikit-learn's bundled 8x8 handwritten digits (no download)",
                "The 1,797 real 8x8 handwritten digits that ship with scikit-learn "
                "(sklearn.datasets.load_digits): a quick start without any download.")
    p.add_argument("--size", type=_size, metavar="HxW", help="resize (e.g. 32x32)")
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one worth showing (not None or False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _common_options():
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output and splits")
    g.add_argument("--out", required=True, type=Path, metavar="FILE.h5",
                   help="the HDF5 file to write (atomically)")
    g.add_argument("--name", help="data set name stored in the file (default: from the source)")
    g.add_argument("--val-fraction", type=_fraction, default=None, metavar="F",
                   help="fraction of the samples for the validation split (default 0.1; of "
                        "train, for sources with an official test split), stratified by label")
    g.add_argument("--test-fraction", type=_fraction, default=None, metavar="F",
                   help="fraction for the test split (default 0.2); not allowed where an "
                        "official test split is kept, unless --fresh-split")
    g.add_argument("--seed", type=int, default=0, help="seed of the splits and of --limit")
    g.add_argument("--limit", type=_positive_int, metavar="N",
                   help="use at most N samples (per official split), stratified: quick runs")
    g.add_argument("--dtype", choices=("float32", "uint8"), default="float32",
                   help="image storage: float32, or uint8 = round(x * 255), 4x smaller and "
                        "lossless for 8-bit sources (MNIST, CIFAR, 8-bit images at their size)")
    g.add_argument("--quiet", action="store_true", help="print only errors and the summary")
    return common


def _download_options(p):
    p.add_argument("--download", action="store_true",
                   help="download missing files from the official mirrors into --src "
                        "(md5-checked)")
    p.add_argument("--fresh-split", action="store_true",
                   help="pool the official train and test splits and split them anew with "
                        "--val-fraction and --test-fraction")


def _file_sources(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--src", type=Path, metavar="DIR",
                     help="folder with one sub-folder of files per class")
    src.add_argument("--manifest", type=Path, metavar="CSV",
                     help="CSV file listing the files (paths relative to it) and their labels")
    p.add_argument("--image-column", default="image", help="manifest column of the file paths")
    p.add_argument("--label-column", default="label", help="manifest column of the labels")
    p.add_argument("--group-column", metavar="COLUMN",
                   help="manifest column of a group id (e.g. patient): no group is split "
                        "across train/val/test")
    p.add_argument("--split-column", metavar="COLUMN",
                   help="manifest column with each file's official split (train/val/test), "
                        "kept as it is instead of drawing splits")
    p.add_argument("--classes", type=_names, metavar="A,B,...",
                   help="class names in label order; any other label is an error "
                        "(default: all labels found, in natural order)")


def _split_options(args):
    from data_prep.errors import PrepError
    from data_prep.splits import DEFAULT_VAL_FRACTION, SplitOptions

    if getattr(args, "split_column", None) and args.val_fraction is not None:
        raise PrepError("--val-fraction does not apply with a split column (its splits are "
                        "kept as they are)")
    val = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
    return SplitOptions(val_fraction=val, test_fraction=args.test_fraction, seed=args.seed,
                        limit=args.limit)


def _run_mnist(args):
    from data_prep import mnist

    return mnist.convert(args.out, src=args.src, variant=args.variant,
                         download_missing=args.download, fresh_split=args.fresh_split,
                         split_options=_split_options(args), name=args.name,
                         dtype=args.dtype)


def _run_cifar(args):
    from data_prep import cifar

    return cifar.convert(args.out, src=args.src, variant=args.variant,
                         label_type=args.label_type, download_missing=args.download,
                         fresh_split=args.fresh_split, split_options=_split_options(args),
                         name=args.name, dtype=args.dtype)


def _run_images(args):
    from data_prep import images

    return images.convert(args.out, src=args.src, manifest=args.manifest,
                          image_column=args.image_column, label_column=args.label_column,
                          group_column=args.group_column, label_regex=args.label_regex,
                          classes=args.classes, size=args.size, mode=args.mode,
                          split_column=args.split_column, split_options=_split_options(args),
                          name=args.name, dtype=args.dtype)


def _run_nifti(args):
    from data_prep import nifti

    return nifti.convert(args.out, src=args.src, manifest=args.manifest,
                         image_column=args.image_column, label_column=args.label_column,
                         group_column=args.group_column, classes=args.classes,
                         shape_xyz=args.shape, window=args.window,
                         split_column=args.split_column, split_options=_split_options(args),
                         name=args.name, dtype=args.dtype)


def _run_digits(args):
    from data_prep import digits

    return digits.convert(args.out, size=args.size, split_options=_split_options(args),
                          name=args.name or "digits", dtype=args.dtype)


RUNNERS = {"mnist": _run_mnist, "cifar": _run_cifar, "images": _run_images,
           "nifti": _run_nifti, "digits": _run_digits}


def _fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _size(text):
    """``HxW`` (or ``N`` for N x N) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size *= 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HxW such as 112x92")
    return size


def _names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of distinct names A,B,...")
    return names
