"""AWS Lambda entry point: `handlers.lambda_handler.handler`.

Lifespan is off: under Lambda it would run on every invocation, and the app keeps its
clients per process instead (see handlers.aws).
"""

from mangum import Mangum

from handlers.app import app

handler = Mangum(app, lifespan="off")
