"""Brokers: the interface (base.py), the embedded one (memory.py), RabbitMQ (amqp.py)."""
