"""`python -m sandbox [--bind HOST:PORT]`: run the sandbox platform in the foreground."""

import argparse
import logging

from .app import serve


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m sandbox', description='Run the local sandbox platform.')
    parser.add_argument('--bind', default='127.0.0.1:8090', help='HOST:PORT to listen on (default %(default)s)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    serve(bind=args.bind)


if __name__ == '__main__':
    main()
