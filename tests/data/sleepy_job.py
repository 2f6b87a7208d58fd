"""A job whose one step holds a device and sleeps: the test kills the process running `dagster job execute`."""

import os
import time
from pathlib import Path

import dagster as dg

from harp_resources import DeviceResource


@dg.op
def hold_the_device(device: DeviceResource) -> None:
    Path(os.environ["HARP_TEST_PID_FILE"]).write_text(str(os.getpid()))
    time.sleep(120)


@dg.job(resource_defs={"device": DeviceResource(device="cpu")})
def sleepy() -> None:
    hold_the_device()
