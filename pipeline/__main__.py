"""``python -m kdcache.pipeline`` — what launchers (torchrun, accelerate launch) call."""

from kdcache.pipeline.cli import main

if __name__ == "__main__":
    main()
