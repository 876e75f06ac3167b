"""Reads messages the relay published with the official CloudEvents SDK
(PyPI `cloudevents`, its RabbitMQ binding) and prints what it found.

Input (argv[1]): a JSON list of {"content_type", "headers", "body"} as the
test queue received them. Output: a JSON list, per message, of the content
mode the SDK detected and every attribute it read, or exit 1 with the
SDK's error. Run by tests/relay/cloudevents_sdk.rs.
"""

import json
import sys

from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_rabbitmq
from cloudevents.core.formats.json import JSONFormat

REQUIRED = ("id", "source", "type", "specversion")

found = []
for message in json.load(open(sys.argv[1], encoding="utf-8")):
    content_type = message["content_type"]
    mode = "structured" if content_type.startswith("application/cloudevents") else "binary"
    event = from_rabbitmq(
        RabbitMQMessage(
            headers=message["headers"],
            content_type=content_type,
            body=message["body"].encode("utf-8"),
        ),
        JSONFormat(),
    )
    attributes = event.get_attributes()
    missing = [name for name in REQUIRED if not attributes.get(name)]
    if missing:
        print(f"missing required attributes {missing} in {attributes}", file=sys.stderr)
        sys.exit(1)
    found.append(
        {
            "mode": mode,
            "attributes": {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in attributes.items()},
            "data": event.get_data(),
        }
    )
print(json.dumps(found))
