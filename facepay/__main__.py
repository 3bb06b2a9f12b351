from facepay.app.cli import main

main()
