"""What the tests share, by concern: helpers_core (settings, ports, waiting,
HTTP, services as subprocesses), helpers_postgres, helpers_rabbitmq and
helpers_faults. Test modules `import helpers` and use the names below."""

from helpers_core import BILLING_TEST_DB
from helpers_core import ENV
from helpers_core import LOGS
from helpers_core import MOVIES_TEST_DB
from helpers_core import PYTHON
from helpers_core import ROOT
from helpers_core import Service
from helpers_core import billing_env
from helpers_core import call
from helpers_core import free_port
from helpers_core import gateway_env
from helpers_core import inventory_env
from helpers_core import mapped_files
from helpers_core import rabbit_env
from helpers_core import shared_block
from helpers_core import wait_for
from helpers_faults import ANSWER_WITHIN
from helpers_faults import CLIENT_ERRORS
from helpers_faults import MIB
from helpers_faults import REQUEST_TIMEOUT
from helpers_faults import Client
from helpers_faults import Posters
from helpers_faults import TcpProxy
from helpers_faults import figure
from helpers_faults import order
from helpers_faults import start_gateway
from helpers_faults import timed_call
from helpers_faults import wait_stored
from helpers_postgres import _pg_accepts
from helpers_postgres import admin_connect
from helpers_postgres import count_orders
from helpers_postgres import pg
from helpers_postgres import pg_online
from helpers_postgres import recreate_database
from helpers_postgres import rows
from helpers_postgres import stored_users
from helpers_rabbitmq import _rabbit_accepts
from helpers_rabbitmq import delete_queues
from helpers_rabbitmq import drain_queue
from helpers_rabbitmq import message_id
from helpers_rabbitmq import publish_raw
from helpers_rabbitmq import queue_depth
from helpers_rabbitmq import rabbit
from helpers_rabbitmq import rabbit_channel
from helpers_rabbitmq import rabbit_params

__all__ = [
    "ANSWER_WITHIN",
    "BILLING_TEST_DB",
    "CLIENT_ERRORS",
    "ENV",
    "LOGS",
    "MIB",
    "MOVIES_TEST_DB",
    "PYTHON",
    "REQUEST_TIMEOUT",
    "ROOT",
    "Client",
    "Posters",
    "Service",
    "TcpProxy",
    "_pg_accepts",
    "_rabbit_accepts",
    "admin_connect",
    "billing_env",
    "call",
    "count_orders",
    "delete_queues",
    "drain_queue",
    "figure",
    "free_port",
    "gateway_env",
    "inventory_env",
    "mapped_files",
    "message_id",
    "order",
    "pg",
    "pg_online",
    "publish_raw",
    "queue_depth",
    "rabbit",
    "rabbit_channel",
    "rabbit_env",
    "rabbit_params",
    "recreate_database",
    "rows",
    "shared_block",
    "start_gateway",
    "stored_users",
    "timed_call",
    "wait_for",
    "wait_stored",
]
