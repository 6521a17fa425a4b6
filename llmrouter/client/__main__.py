import sys

from llmrouter.client.cli import main

sys.exit(main())
