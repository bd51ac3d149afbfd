"""gRPC ingress: validates requests and makes them durable events in Kafka before acknowledging."""

from services.ingress._server import IngressServer, serve
from services.ingress._service import ChatService
from services.ingress._validation import RequestRejected

__all__ = ["ChatService", "IngressServer", "RequestRejected", "serve"]
