"""Faults between the three hosts, judged by a checker that reads every answer.

For each fault of helpers_injector.all_faults(): clients record every
operation through the gateway from the reviewer's address (helpers_checker)
while the fault is on and until /health is 200 again; then the checker
compares what they were told with what billing_db and movies_db hold. One row
per fault goes to the "faults between hosts" table at the end of the run.
"""

import helpers
import pytest
from helpers_faultrun import run_fault
from helpers_hosts import gateway_healthy
from helpers_injector import all_faults
from helpers_injector import heal_everything

FAULTS = all_faults()


@pytest.fixture(scope="module")
def hosts_for_faults(three_hosts):
    """The three hosts, healthy; every fault undone at the end, whatever happened."""
    helpers.wait_for(gateway_healthy, 120, interval=0.5, what="health 200")
    yield
    heal_everything()


@pytest.mark.parametrize("index", range(len(FAULTS)), ids=[f.name for f in FAULTS])
def test_fault(hosts_for_faults, index):
    """Nothing acknowledged is lost or doubled, no unexpected row, no 500, no
    answer past its deadline, and /health recovers by itself (run_fault)."""
    run_fault(FAULTS[index], index)
