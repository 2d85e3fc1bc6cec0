from trainer.worker import main

main()
