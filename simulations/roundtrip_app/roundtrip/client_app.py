"""Echo ClientApp: returns the array it received (numpy only, so its process starts fast)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("echo")
def echo(msg: Message, context: Context) -> Message:
    return Message(msg.content, reply_to=msg)
