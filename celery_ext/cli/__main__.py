import sys

from celery_ext.cli import main

sys.exit(main())
