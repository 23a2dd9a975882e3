"""`minisd download mnist|fashion_mnist|cifar10`: fetch the official files into the data directory, verified.

    minisd download mnist                                # into $MINISD_DATA or ~/.cache/minisd/data
    minisd download cifar10 --data-dir ./data            # ./data/cifar10/cifar-10-batches-bin/*.bin
    minisd download mnist --mirror http://host/mnist/    # same file names under another base URL

Official sources (listed with their checksums in minisd/datasets.py): MNIST from
https://ossci-datasets.s3.amazonaws.com/mnist/ (then http://yann.lecun.com/exdb/mnist/), Fashion-MNIST from
http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ (then Zalando's GitHub), CIFAR-10 binary version from
https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz. A machine without internet access (like minisd's
development machines) cannot reach them: copy the files into the layout by hand, or serve them and use --mirror.
Interrupted downloads resume when the command is run again.
"""
from ..datasets import DATASETS, DEFAULT_DATA_DIR, download_dataset, resolve_data_dir
from ..errors import UserError


def configure(parser):
    parser.add_argument("datasets", nargs="+", choices=sorted(DATASETS), metavar="DATASET",
                        help=f"one or more of: {', '.join(DATASETS)}")
    parser.add_argument("--data-dir", default=None,
                        help=f"data directory (default: $MINISD_DATA, else {DEFAULT_DATA_DIR}); files go to "
                             f"DIR/mnist/, DIR/fashion_mnist/, DIR/cifar10/cifar-10-batches-bin/")
    parser.add_argument("--mirror", default=None, metavar="URL",
                        help="base URL to fetch from instead of the official sites (the official file names are "
                             "appended); the publisher's md5 of the download is then not checked, the sha256 of "
                             "the decompressed content still is")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip checksum verification (on by default; each file is verified once and "
                             "stamped)")
    parser.add_argument("--keep-archive", action="store_true",
                        help="keep cifar-10-binary.tar.gz after extracting it")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def run(args):
    log = (lambda msg: None) if args.quiet else print
    for name in dict.fromkeys(args.datasets):  # keep order, drop repeats
        try:
            download_dataset(name, data_dir=args.data_dir, mirror=args.mirror, verify=not args.no_verify,
                             keep_archive=args.keep_archive, progress=not args.quiet, log=log)
        except OSError as e:  # a read-only or full data directory: say where, not a traceback
            raise UserError(f"{name}: cannot write the files: {e}. Choose a writable --data-dir (now "
                            f"{resolve_data_dir(args.data_dir)}) with enough free space.") from None
    return 0
