"""
What tools/train_net.py runs, in one process under settings whose runs are bitwise reproducible on any CPU
(one thread, torch's deterministic algorithms), optionally killing itself with SIGKILL, as a
pre-empted cluster job is killed, for tests/robustness/test_robustness_runs.py.

    python tests/scripts/deterministic_train_net.py [--kill-after-iter N]
        [--kill-writing FILE_NAME] -- TRAIN_NET_ARGS...

--kill-after-iter N: SIGKILL once iteration N has run (between checkpoints).
--kill-writing FILE_NAME: SIGKILL while the checkpoint FILE_NAME is being written: its data is
on disk under FILE_NAME.tmp and not yet renamed.
"""
import argparse
import os
import signal

import torch

from detectron2.engine import HookBase

from vfnet import engine


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterIteration(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            kill_self()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-iter", type=int)
    parser.add_argument("--kill-writing")
    args, train_net_args = parser.parse_known_args()
    if train_net_args[:1] == ["--"]:
        train_net_args = train_net_args[1:]

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    if args.kill_after_iter is not None:
        build_hooks = engine.Trainer.build_hooks

        def build_hooks_and_kill(self):
            return build_hooks(self) + [KillAfterIteration(args.kill_after_iter)]

        engine.Trainer.build_hooks = build_hooks_and_kill
    if args.kill_writing is not None:
        replace = os.replace

        def replace_or_kill(src, dst):
            if os.path.basename(dst) == args.kill_writing:
                kill_self()
            return replace(src, dst)

        os.replace = replace_or_kill

    engine.main(engine.default_argument_parser().parse_args(train_net_args))


if __name__ == "__main__":
    main()
