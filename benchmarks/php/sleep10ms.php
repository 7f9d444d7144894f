<?php
usleep(10000);
header('Content-Type: text/plain');
echo 'Hello, world!';
